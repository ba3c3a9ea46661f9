"""Numerics fingerprint of the lab on the tiny random Llama: alignment and fine-tuning (plain, SPF with the
exact / randomized basis, gradient / update projection, LoRA) with fixed seeds, as loss histories and weight
hashes. Run it before and after a refactoring on the same machine; the two JSON files must be equal.

``python -m bench.lab_numerics OUT.json [--compare BEFORE.json]`` (one torch thread; a temporary cache)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile


def _sha(tensors) -> str:
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint() -> dict:
    import torch
    from safetensors.torch import load_file

    from analysis.lab import align as al
    from analysis.lab.config import preset
    from analysis.lab.finetune import run_finetune
    from analysis.llm.models import load_model

    torch.set_num_threads(1)
    out = {}
    tiny = dict(steps=7, batch_size=4, safety_per_batch=2, n_safety=12, n_utility=6, distill_max_new_tokens=6,
                distill_batch_size=6, lr=3e-3, warmup_steps=2, max_length=128, train_layer_fraction=0.5,
                borderline=True, borderline_per_batch=1)
    for name, settings in {"align": al.AlignSettings(**tiny),
                           "align_noclip_full": al.AlignSettings(**{**tiny, "grad_clip": 0.0, "train_layer_fraction": 1.0,
                                                                    "seed": 2})}.items():
        report = al.align_model(load_model("tiny-llama"), settings)
        out[name] = {"losses": report.losses, "safety": report.safety_losses, "utility": report.utility_losses,
                     "hash": report.weights_hash}
    fast = dict(model="tiny-llama", max_length=96, eval_harmful_per_category=1, n_eval_utility=2,
                gen_harmful_per_category=1, n_gen_benign=2, gen_max_new_tokens=4, gen_batch_size=16,
                lr=1e-3, n_train=6, batch_size=3, epochs=2, eval_every=2)
    configs = {
        "plain": preset("harmful-10", **fast, method="plain"),
        "spf": preset("harmful-10", **fast, method="spf", spf=dict(k=3, refresh=3)),
        "spf_rand_update": preset("harmful-10", **fast, method="spf", max_grad_norm=0.5,
                                  spf=dict(k=3, refresh=2, svd="randomized", target="update", safety_loss="contrast")),
        "spf_orth_sgd": preset("harmful-10", **fast, method="spf", optimizer="sgd", trainable="linear",
                               spf=dict(k=4, refresh=1, mode="orthogonal", svd="randomized", oversample=4)),
        "lora": preset("harmful-10", **{**fast, "lr": 1e-2}, method="plain", trainable="lora", lora_rank=2),
    }
    root = os.path.join(os.environ["SSE_CACHE_DIR"], "ft")
    for name, config in configs.items():
        result = run_finetune(config, root=root)
        history = result.history.drop(columns=["wall_seconds", "cpu_seconds"])
        out["ft_" + name] = {
            "run_id": result.run_id, "history": json.loads(history.to_json(orient="records", double_precision=15)),
            "weights": _sha(load_file(str(result.model_path / "model.safetensors"))),
            "evals": hashlib.sha256(json.dumps(result.evals, sort_keys=True).encode()).hexdigest()[:16],
            "spf_removed": hashlib.sha256(result.spf_removed().to_numpy().tobytes()).hexdigest()[:16]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab_numerics", description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--compare", default=None, help="an earlier OUT.json: report which runs differ")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SSE_CACHE_DIR"] = tempfile.mkdtemp(prefix="lab_numerics")
    result = fingerprint()
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
    for name, entry in result.items():
        print(f"{name:20s} {entry.get('hash') or entry.get('weights')}")
    if args.compare:
        with open(args.compare) as handle:
            before = json.load(handle)
        def text(value) -> str:  # NaN != NaN: compare the JSON text
            return json.dumps(value, sort_keys=True)

        differ = [name for name in before if text(before[name]) != text(result.get(name))]
        print(f"DIFFERENT from {args.compare}: {', '.join(differ)}" if differ else f"identical to {args.compare}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
