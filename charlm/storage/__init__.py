"""Reading and writing model files: checkpoints, safetensors and ONNX exports."""
