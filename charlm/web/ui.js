// The charlm page's UI: one UI, two back ends (the model in the page, or `charlm serve`).
// window.charlmBackend (set by the script before this one) provides card() and
// generate(prompt, options, onText, signal); see charlm/web/__init__.py. Every string from the
// model or the server is put in with textContent, never parsed as HTML.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const backend = window.charlmBackend;
  const status = (text, error) => {
    $("status").textContent = text;
    $("status").className = error ? "error" : "";
  };
  if (!backend) {
    status("no back end: this page cannot generate", true);
    return;
  }

  const LABELS = {
    cell: "cell", embed_size: "embedding", hidden_size: "hidden", num_layers: "layers",
    parameters: "parameters", vocab_size: "vocabulary", train_file: "training text",
    best_val_loss: "best validation loss", charlm_version: "charlm", run: "run", weights: "weights",
  };
  function cardValue(key, value) {
    if (key === "best_val_loss" && typeof value === "number") {
      return value.toFixed(4) + " nats/char (" + (value / Math.LN2).toFixed(4) + " bits/char)";
    }
    if (key === "parameters" && typeof value === "number") return value.toLocaleString("en");
    if (key === "vocab_size" && typeof value === "number") return value + " characters";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  function showCard(card) {
    const dl = $("card");
    dl.textContent = "";
    for (const key of Object.keys(card || {})) {
      const value = card[key];
      if (value === null || value === undefined || value === "") continue;
      const dt = document.createElement("dt");
      dt.textContent = LABELS[key] || key;
      const dd = document.createElement("dd");
      dd.textContent = cardValue(key, value);
      dl.append(dt, dd);
    }
  }
  Promise.resolve().then(() => backend.card()).then(showCard,
    (e) => status("cannot read the model card: " + (e && e.message || e), true));

  function number(id, integer) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    const value = Number(raw);
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      throw new Error(id.replace("_", "-") + " must be a" + (integer ? "n integer" : " number"));
    }
    return value;
  }

  let controller = null;
  async function generate() {
    let options;
    try {
      options = {
        length: number("length", true) ?? 500,
        temperature: number("temperature", false) ?? 1,
        top_k: number("top_k", true) ?? 0,
        top_p: number("top_p", false) ?? 1,
        seed: number("seed", true),
        stop: $("stop_texts").value.split("\n").filter((s) => s !== ""),
      };
    } catch (e) {
      status(e.message, true);
      return;
    }
    const prompt = $("prompt").value;
    $("output-prompt").textContent = prompt;
    const out = $("output-text");
    out.textContent = "";
    controller = new AbortController();
    $("generate").disabled = true;
    $("stop").disabled = false;
    status("generating…");
    const started = performance.now();
    let chars = 0;
    try {
      const text = await backend.generate(prompt, options, (chunk) => {
        out.append(chunk); // a text node: shown literally
        chars += [...chunk].length;
      }, controller.signal);
      if (out.textContent !== text) out.textContent = text; // the final text is the truth
      chars = [...text].length;
      const seconds = (performance.now() - started) / 1000;
      status((controller.signal.aborted ? "stopped: " : "") + chars.toLocaleString("en") +
        " characters in " + seconds.toFixed(2) + " s");
    } catch (e) {
      status("error: " + (e && e.message || e), true);
    } finally {
      controller = null;
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  }
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) generate();
  });
})();
