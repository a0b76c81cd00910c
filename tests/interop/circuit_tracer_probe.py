"""Runs inside circuit-tracer's own environment (it cannot share ours): loads an export with
circuit-tracer's loader and runs circuit-tracer's encode/decode on given inputs.

    python circuit_tracer_probe.py REQUEST.json

REQUEST: {"dir": absolute export directory, "inputs": safetensors with x [L, B, d], "outputs": path}.
Writes f [L, B, F] and y [L, B, d] to "outputs" and prints what was loaded as one JSON line.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

request = json.loads(open(sys.argv[1]).read())
model, config = load_transcoder_from_hub(request["dir"], device=torch.device("cpu"), dtype=torch.float32,
                                         lazy_encoder=False, lazy_decoder=False)
x = load_file(request["inputs"])["x"]
with torch.no_grad():
    if config["model_kind"] == "transcoder_set":
        f = torch.stack([model[layer].encode(x[layer]) for layer in range(len(model))])
        y = torch.stack([model[layer].decode(f[layer], x[layer]) for layer in range(len(model))])
        n_layers, activation = len(model), type(model[0].activation_function).__name__
    else:
        f = model.encode(x)
        y = model.decode(f)
        n_layers, activation = model.n_layers, type(model.activation_function).__name__
save_file({"f": f.contiguous(), "y": y.contiguous()}, request["outputs"])
print(json.dumps({"model_kind": config["model_kind"], "n_layers": n_layers, "activation": activation,
                  "feature_input_hook": model.feature_input_hook, "feature_output_hook": model.feature_output_hook}))
