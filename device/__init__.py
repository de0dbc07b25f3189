"""The on-device runtime: what gets flashed to a phone or board. Never imports torch.

Needs numpy, stock onnxruntime, tokenizers and paho-mqtt only.
"""
