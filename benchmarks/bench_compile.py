"""predict's --compile against the eager model, in one process, timed in alternating rounds.

    python benchmarks/bench_compile.py [--model lseg_vitb16_384] [--precision bf16] [--rounds 4] [--batch 8]
                                       [--device cpu] [--layout]

On a shared VM the machine's speed drifts by tens of percent between minutes, so two separate runs
cannot tell a 1.3x gain from noise; here the eager and the compiled image branch (the same weights)
alternate, each timed for 4 s per round, and each round's ratio is printed. The compile time
(Segmenter.compile: torch.compile, frozen weights on a CPU) is printed first. --layout compares
instead the eager model with its convolutions channels-first (predict's layout) against
channels-last, and how far their outputs differ.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lseg_vitb16_384")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layout", action="store_true", help="channels-first against channels-last, both eager")
    args = ap.parse_args()
    from segcli.api import Segmenter
    from segcli.inference.settings import InferenceSettings

    seg = Segmenter.from_pretrained(args.model, device=args.device, precision=args.precision, imgsz=args.imgsz, warn=False)
    seg.configure(InferenceSettings(window=0))
    model = seg.model
    eager = type(model).pixel_embeddings.__get__(model)
    if args.layout:
        import copy

        first = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        eager, compiled = first.pixel_embeddings, last.pixel_embeddings
        print(f"{args.model}, batch {args.batch} at {args.imgsz}, {args.precision}, {torch.get_num_threads()} threads; "
              "'eager' below is channels-first, 'compiled' channels-last, both eager")
    else:
        print(f"{args.model}, batch {args.batch} at {args.imgsz}, {args.precision}, {torch.get_num_threads()} threads; "
              f"compiled in {seg.compile(args.batch):.1f} s")
        compiled = model.pixel_embeddings
    images = torch.rand(args.batch, 3, args.imgsz, args.imgsz, device=seg.device)
    dtype = seg.autocast_dtype
    sync = torch.cuda.synchronize if seg.device.type == "cuda" else (lambda: None)

    def rate(fn, seconds: float = 4.0) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            with torch.inference_mode(), torch.autocast(seg.device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                fn(images)
            n += 1
        sync()
        return args.batch * n / (time.perf_counter() - t0)

    rate(eager, 1.0), rate(compiled, 1.0)  # warm-up
    if args.layout:
        with torch.inference_mode(), torch.autocast(seg.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            a, b = eager(images).float(), compiled(images).float()
        print(f"outputs' largest difference {(a - b).abs().max().item():.3g} (values up to {a.abs().max().item():.3g})")
    print("| round | eager img/s | compiled img/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for r in range(args.rounds):
        e, c = rate(eager), rate(compiled)
        print(f"| {r} | {e:.2f} | {c:.2f} | {c / e:.2f} |", flush=True)


if __name__ == "__main__":
    main()
