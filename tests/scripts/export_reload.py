"""Load exported models in a fresh interpreter, as a deployment would, and save their logits.

    python tests/scripts/export_reload.py IDS.npy OUT.npz NAME=PATH...

NAME is pt (torch.load + examples/lm_model.py), torchscript (torch.jit.load) or onnx (ONNX Runtime);
OUT.npz holds each one's logits for the int64 ids in IDS.npy, and NAME_meta its embedded metadata.
"""
import json
import sys
from pathlib import Path

import numpy as np

ids = np.load(sys.argv[1])
results = {}
for arg in sys.argv[3:]:
    name, path = arg.split("=", 1)
    if name == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        results[name] = session.run(None, {"idx": ids})[0]
        meta = session.get_modelmeta().custom_metadata_map["distrib"]
    elif name == "torchscript":
        import torch
        files = {"distrib.json": ""}
        module = torch.jit.load(path, _extra_files=files)
        results[name] = module(torch.from_numpy(ids)).detach().numpy()
        meta = files["distrib.json"].decode()
    else:
        import torch
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
        from lm_model import GPT, GPTConfig
        artifact = torch.load(path, weights_only=True)
        model = GPT(GPTConfig.from_dict(artifact["model_config"]))
        model.load_state_dict(artifact["model_state"])
        results[name] = model.eval()(torch.from_numpy(ids)).detach().numpy()
        meta = json.dumps({"step": artifact["step"], "vocab": artifact["model_config"]["vocab"]})
    results[f"{name}_meta"] = np.array(meta)
np.savez(sys.argv[2], **results)
