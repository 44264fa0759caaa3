"""``charlm inspect``: what a trained model learned, as numbers and one self-contained page.

activations (the cells stepped with the model's weights), features (the text's features and
the units that track them), memory (the state-reset curve), analysis (all of it over a text)
and report (the HTML page)."""
