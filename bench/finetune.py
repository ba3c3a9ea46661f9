"""Cost of an SPF step relative to a plain fine-tuning step, measured in one run.

``python -m bench.finetune [--model default] [--window 10] [--threads 1] [--target gradient]``

Two trainers (plain and SPF, same config and seed, default SPF settings: k=8, R=10, safety batch 4,
conflict mode) train side by side on the real default model, their steps *interleaved* (plain 1, SPF 1,
plain 2, SPF 2, ...) so that load from other processes on a shared machine hits both arms alike. One SPF
window is R steps: step 1 of the window recomputes the safety basis (safety forward/backward + top-k SVD
of every module), the others only project. Reported, wall-clock and CPU time (this process, all threads):

* plain step, SPF step without refresh, SPF refresh step (medians);
* amortised ratio = mean SPF step over the window (refresh included) / mean plain step  -> target <= 1.2;
* refresh cost, split into the safety gradient and the SVDs (timed separately), and the projection alone.

Metric tracking (cosines) is off in both arms, so the ratio is the algorithm's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--preset", default="harmful-100")
    parser.add_argument("--window", type=int, default=None, help="R (steps per basis refresh); default SPFConfig's")
    parser.add_argument("--windows", type=int, default=1, help="how many refresh windows to time")
    parser.add_argument("--target", default=None, choices=("gradient", "update"))
    from analysis.lab.config import SPF_MODES

    parser.add_argument("--mode", default=None, choices=SPF_MODES)
    parser.add_argument("--trainable", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args, _unknown = parser.parse_known_args(argv)

    import torch

    from analysis.lab.config import SPFConfig, preset
    from analysis.lab.defences.spf import project_gradients
    from analysis.lab.finetune_data import seeded
    from analysis.lab.trainer import FinetuneTrainer
    from analysis.llm.anatomy import as_out_in
    from analysis.llm.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    spf = SPFConfig()
    spf = dataclasses.replace(spf, **{k: v for k, v in (("refresh", args.window), ("target", args.target),
                                                         ("mode", args.mode)) if v is not None})
    extra = {"trainable": args.trainable} if args.trainable else {}
    base = preset(args.preset, model=args.model, spf=spf, track_conflict=False, **extra)
    R = spf.refresh
    n_steps = R * args.windows
    plain = FinetuneTrainer.create(dataclasses.replace(base, method="plain"), load_model(args.model))
    arm = FinetuneTrainer.create(dataclasses.replace(base, method="spf"), load_model(args.model))
    n_params = sum(p.numel() for _, p in plain.trainable)
    print(f"model {args.model}, preset {args.preset} (batch {base.batch_size}), trainable={base.trainable} "
          f"({n_params / 1e6:.1f} M parameters), SPF: k={spf.k}, R={R}, safety batch {spf.safety_batch}, "
          f"{spf.mode}/{spf.target}, {len(arm.projector.modules)} modules, torch threads {torch.get_num_threads()}")

    times = {"plain": [], "spf": []}
    for step in range(1, n_steps + 2):
        for name, trainer in (("plain", plain), ("spf", arm)):
            _, wall, cpu = _timed(lambda trainer=trainer, step=step: trainer.train_step(step))
            times[name].append((step, wall, cpu))
        print(f"  step {step:3d}: plain {times['plain'][-1][1]:6.2f} s wall, SPF {times['spf'][-1][1]:6.2f} s wall"
              f"{'  (refresh)' if (step - 1) % R == 0 else ''}", flush=True)
    # Step 1 (a refresh step in the SPF arm) is the warm-up and is dropped from both arms; step R+1, 2R+1, ...
    # are the timed refresh steps.
    plain_steps = [t for t in times["plain"] if t[0] > 1]
    spf_refresh = [t for t in times["spf"] if (t[0] - 1) % R == 0 and t[0] > 1]
    spf_plain = [t for t in times["spf"] if (t[0] - 1) % R != 0]

    # refresh components, timed separately at the current weights
    step = n_steps + 2
    plain.train_step(step)  # gives the plain trainer fresh gradients to project
    safety, sg_wall, sg_cpu = _timed(lambda: arm.safety_gradients(step))
    _, svd_wall, svd_cpu = _timed(lambda: arm.projector.refresh_basis(safety, step, seeded(base.seed, "basis", step)))
    grads = {m.name: as_out_in(m.module, m.weight.grad).clone() for m in arm.projector.modules}
    _, pr_wall, pr_cpu = _timed(lambda: project_gradients(grads, arm.projector.basis, spf.mode))

    def med(rows, i):
        return statistics.median(r[i] for r in rows) if rows else float("nan")

    print()
    print(f"{'':34s}{'wall s':>10s}{'cpu s':>10s}")
    rows = [("plain step (median)", med(plain_steps, 1), med(plain_steps, 2)),
            ("SPF step, no refresh (median)", med(spf_plain, 1), med(spf_plain, 2))]
    if spf_refresh:
        rows.append(("SPF refresh step (median)", med(spf_refresh, 1), med(spf_refresh, 2)))
    rows += [("  safety gradient (separately)", sg_wall, sg_cpu), ("  top-k SVDs, all modules", svd_wall, svd_cpu),
             ("  projection alone, all modules", pr_wall, pr_cpu)]
    for label, wall, cpu in rows:
        print(f"{label:34s}{wall:10.3f}{cpu:10.3f}")
    refresh_wall = (med(spf_refresh, 1) if spf_refresh else med(spf_plain, 1) + sg_wall + svd_wall)
    refresh_cpu = (med(spf_refresh, 2) if spf_refresh else med(spf_plain, 2) + sg_cpu + svd_cpu)
    for label, i, refresh in (("wall", 1, refresh_wall), ("cpu", 2, refresh_cpu)):
        amortised = (refresh + (R - 1) * med(spf_plain, i)) / R
        ratio = amortised / med(plain_steps, i)
        print(f"SPF / plain ({label}): {med(spf_plain, i) / med(plain_steps, i):.3f} without refresh, "
              f"{refresh / med(plain_steps, i):.2f} on a refresh step, {ratio:.3f} amortised over R={R} "
              f"[{'OK' if ratio <= 1.2 else 'ABOVE'} target 1.2]")
    if not spf_refresh:
        print("(no timed refresh step: the refresh-step cost is the no-refresh SPF step + the separately timed "
              "safety gradient and SVDs; use --windows 2 to time real refresh steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
