"""`jumpflow` command line: parse flags, call the Python API, print. Errors are one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .errors import JumpflowError


def _train(args) -> None:
    from . import api, methods
    from .config import TrainConfig, apply_overrides, parse_overrides
    from .distributed import is_main_process
    from .presets import get_preset

    flags = {"method": args.method, "data": args.data, "steps": args.steps, "backbone": args.backbone,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.class_conditional:
        given["class_conditional"] = True
    overrides = parse_overrides(args.overrides)
    if args.resume:  # only what the user typed; the run's saved config supplies the rest
        ckpt = api.train({**given, **overrides}, args.out, resume=True)
        if is_main_process():  # under torchrun, one line rather than one per process
            print(f"run {args.out} resumed; latest checkpoint: {ckpt}")
        return
    values = TrainConfig().to_dict()
    if args.preset:
        values.update(get_preset(args.preset))
    values.update(given)
    method_fields = [f.name for f in dataclasses.fields(methods.METHODS[values["method"]].Config)]
    cfg = TrainConfig.from_dict(apply_overrides(values, overrides, method_fields))
    ckpt = api.train(cfg, args.out)
    if is_main_process():
        print(f"run written to {args.out}; final checkpoint: {ckpt}")


def _distill(args) -> None:
    from . import api
    from .config import parse_overrides

    flags = {"steps": args.steps, "backbone": args.backbone, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed}
    changes = {**{k: v for k, v in flags.items() if v is not None}, **parse_overrides(args.overrides)}
    if args.resume:
        ckpt = api.distill(None, None, args.out, changes, resume=True)
        print(f"run {args.out} resumed; latest checkpoint: {ckpt}")
        return
    if not args.teacher or not args.method:
        raise JumpflowError("give --teacher RUN_OR_CHECKPOINT and --method NAME (or --resume)")
    ckpt = api.distill(args.teacher, args.method, args.out, changes)
    print(f"student written to {args.out}; final checkpoint: {ckpt} (sample it with `jumpflow sample --ckpt "
          f"{args.out}`)")


def _sample(args) -> None:
    from . import api
    from .config import parse_overrides
    from .plots import save_samples

    from .distributed import is_main_process, launch_device

    model = api.load(args.ckpt, device=launch_device())  # under torchrun: one GPU per local rank
    noise = _read_array(args.noise, "noise") if args.noise else None
    if noise is None and (args.n is None or args.n < 1):
        raise JumpflowError("give --n N (a positive integer) or --noise FILE.npy")
    seed = args.seed if args.seed is not None else 0
    if noise is None:
        noise = model.noise(args.n, seed)
    options = parse_overrides(args.options)  # the method's own sampling options (iMF: interval=[0.4,0.65])
    samples = model.generate_across_ranks(noise, steps=args.steps, cls=args.cls, guidance=args.guidance, seed=seed,
                                          batch_size=args.batch_size, **options)
    if not is_main_process():  # rank 0 writes what all ranks generated
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, samples.numpy())
    elif out.suffix == ".npz":
        np.savez(out, samples=samples.numpy(), noise=np.asarray(noise, dtype=np.float32))
    elif out.suffix == ".png":
        save_samples(out, samples)
    else:
        raise JumpflowError(f"--out must end in .npy, .npz or .png, got {out.name!r}")
    print(f"wrote {samples.shape[0]} samples ({args.steps or model.method.default_sample_steps} steps) to {out}")


def _read_array(path: str, what: str, key_order=("samples", "x", "arr_0")) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise JumpflowError(f"{what} file {p} does not exist")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise JumpflowError(f"cannot read {what} file {p}: {e}") from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
        key = next((k for k in key_order if k in loaded.files), None)
        if key is None:
            raise JumpflowError(f"{p} has arrays {loaded.files}; expected one named {', '.join(key_order)}")
        return loaded[key]
    return loaded


def _eval(args) -> None:
    from . import api

    samples = _read_array(args.samples, "samples")
    noise = None
    if args.samples.endswith(".npz"):
        with np.load(args.samples, allow_pickle=False) as f:
            noise = f["noise"] if "noise" in f.files else None
    if samples.dtype.kind not in "fiu":
        raise JumpflowError(f"samples must be numeric, got dtype {samples.dtype}")
    result = api.evaluate(torch.from_numpy(samples.astype(np.float32)), args.data,
                          noise=None if noise is None else torch.from_numpy(noise), seed=args.seed)
    print(json.dumps(result, indent=2))


def _methods(args) -> None:
    from .methods import catalogue

    entries = catalogue()
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    width = max(len(e["name"]) for e in entries) + 2
    for e in entries:
        print(f"{e['name']:<{width}} {e['kind']:<13} {e['paper']}")
        print(f"{'':<{width}} defaults: {', '.join(f'{k}={v}' for k, v in e['defaults'].items())}")


def _bench(args) -> None:
    from .bench import get_spec, run_bench

    spec = get_spec(args.preset, methods=args.methods, datasets=args.datasets, steps=args.steps,
                    time_limit_s=args.seconds, n_eval=args.n_eval, seed=args.seed,
                    peers=False if args.no_peers else None)
    out = Path(args.out or f"runs/bench-{spec.name}")
    run_bench(spec, out, progress=not args.quiet)
    print()
    print((out / "table.md").read_text())
    print(f"written to {out}: results.json, table.md, quality_vs_nfe.png, quality_vs_time.png, samples_*.png")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(out=args.out, steps=args.steps, data=args.data)


def _export(args) -> None:
    from . import api

    model = api.load(args.ckpt)
    if args.format == "diffusers":
        from .diffusers_export import export_diffusers

        out = export_diffusers(model, args.out, overwrite=args.overwrite)
        print(f"wrote a diffusers pipeline of {model.config.method} (step {model.step}) to {out}; load it with "
              f"JumpflowPipeline.from_pretrained({str(out)!r}) from jumpflow.diffusers_export")
        return
    out = model.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"wrote {model.config.method} (step {model.step}) to {out}: config.json, model.safetensors, README.md; "
          f"load it with jumpflow.from_pretrained({str(out)!r})")


def _serve(args) -> None:
    from .serve import run_server  # starlette/uvicorn load only here; a missing extra is a clear error

    run_server(args.ckpt, args.teacher, host=args.host, port=args.port, max_n=args.max_n,
               batch_window_ms=args.batch_window_ms, max_batch=args.max_batch, max_queue=args.max_queue,
               batching=not args.no_batching)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jumpflow", description="Train, sample and evaluate one-step generative models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method on a dataset into a run directory")
    t.add_argument("--method", help="registered method name (see `jumpflow methods`)")
    t.add_argument("--data", help="built-in dataset name, a .npy/.npz file or an image folder")
    t.add_argument("--steps", type=int, help="training steps")
    t.add_argument("--out", required=True, help="run directory (refused if it exists, unless --resume)")
    t.add_argument("--backbone", help="mlp or unet (default: mlp for vectors, unet for images)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--preset", help="named starting config (toy, digits); flags and overrides apply on top")
    t.add_argument("--class-conditional", action="store_true", help="train on the dataset's labels")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field or method option")
    t.set_defaults(func=_train)

    ds = sub.add_parser("distill", help="distil a flow-matching teacher into a one-step student (a run directory)")
    ds.add_argument("--teacher", help="the teacher: a checkpoint or run directory of a flow-matching model")
    ds.add_argument("--method", help="a distillation method (`jumpflow methods` lists them with kind distillation)")
    ds.add_argument("--steps", type=int, help="training steps of the student")
    ds.add_argument("--out", required=True, help="the student's run directory (refused if it exists, unless --resume)")
    ds.add_argument("--backbone", help="the student's backbone (default: the teacher's, with its options)")
    ds.add_argument("--batch-size", type=int)
    ds.add_argument("--lr", type=float)
    ds.add_argument("--seed", type=int)
    ds.add_argument("--resume", action="store_true", help="continue the student in --out from its latest checkpoint")
    ds.add_argument("overrides", nargs="*", metavar="key=value", help="override any config field or method option")
    ds.set_defaults(func=_distill)

    s = sub.add_parser("sample", help="draw samples from a checkpoint (EMA weights); under torchrun every process "
                                      "draws its share and rank 0 writes them all")
    s.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its latest checkpoint)")
    s.add_argument("--n", type=int, help="number of samples")
    s.add_argument("--steps", type=int, help="network jumps (1 = one step); default: the method's own")
    s.add_argument("--seed", type=int, help="seed for the starting noise (default 0)")
    s.add_argument("--noise", help="a .npy of starting noise (N, *shape) to use instead of drawing it")
    s.add_argument("--class", dest="cls", type=int, help="class label for a class-conditional model")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (methods that take one, with --class)")
    s.add_argument("options", nargs="*", metavar="key=value",
                   help="sampling options of the method, e.g. iMF's guidance interval: interval=[0.4,0.65]")
    s.add_argument("--batch-size", type=int, help="rows per network call (default: all at once)")
    s.add_argument("--out", required=True, help=".npy (samples), .npz (samples + noise) or .png (picture)")
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="metrics of a sample file against a dataset, printed as JSON")
    e.add_argument("--samples", required=True, help=".npy or .npz (an npz from `sample` also carries the noise, "
                                                     "giving the flow-map error against the exact map)")
    e.add_argument("--data", required=True, help="dataset name or file the samples should match")
    e.add_argument("--seed", type=int, default=0, help="seed of the reference draws")
    e.set_defaults(func=_eval)

    m = sub.add_parser("methods", help="list registered methods, their papers and default options")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_methods)

    b = sub.add_parser("bench", help="every method x dataset x NFE under one budget: table, plots, results.json")
    b.add_argument("--preset", default="toys", help="smoke (seconds), toys (minutes), digits (CPU, tens of minutes), "
                                                    "cifar10 (GPU); default toys")
    b.add_argument("--out", help="directory (default runs/bench-PRESET); rerunning skips finished cells")
    b.add_argument("--methods", nargs="+", help="method names, or all (default: all registered)")
    b.add_argument("--datasets", nargs="+", help="datasets (default: the preset's)")
    b.add_argument("--steps", type=int, help="training steps per cell (default: the preset's)")
    b.add_argument("--seconds", type=float, help="wall-clock training budget per cell (stops early if reached)")
    b.add_argument("--n-eval", type=int, help="samples per evaluation")
    b.add_argument("--seed", type=int)
    b.add_argument("--no-peers", action="store_true", help="leave out other packages' implementations")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_bench)

    d = sub.add_parser("demo", help="MeanFlow vs flow matching on a 2-D toy in about two minutes, with a picture")
    d.add_argument("--out", default=None, help="directory (default: a new runs/demo-N)")
    d.add_argument("--steps", type=int, default=None, help="training steps per method")
    d.add_argument("--data", default="checkerboard")
    d.set_defaults(func=_demo)

    ex = sub.add_parser("export", help="write a shareable model folder (Hugging Face Hub layout or diffusers)")
    ex.add_argument("--ckpt", required=True, help="checkpoint file, run directory (its latest checkpoint) or export")
    ex.add_argument("--out", required=True, help="directory to write (a previous export there is replaced)")
    ex.add_argument("--format", choices=("hub", "diffusers"), default="hub",
                    help="hub: config.json + model.safetensors + model card (default); diffusers: a diffusers pipeline "
                         "folder (pip install 'jumpflow[diffusers]')")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty directory that is not an export")
    ex.set_defaults(func=_export)

    sv = sub.add_parser("serve", help="a live web page and HTTP API for a model (pip install 'jumpflow[serve]')")
    sv.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its latest checkpoint)")
    sv.add_argument("--teacher", help="a multi-step run to compare with at 100 steps (same data)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--max-n", type=int, default=1024, help="most samples one request may ask for")
    sv.add_argument("--batch-window-ms", type=float, default=5.0, help="how long a request waits to share a "
                                                                        "forward pass with others (default 5)")
    sv.add_argument("--max-batch", type=int, default=4096, help="most samples in one forward pass")
    sv.add_argument("--max-queue", type=int, default=64, help="most waiting requests; more are refused with 503")
    sv.add_argument("--no-batching", action="store_true", help="one forward pass per request (for benchmarks)")
    sv.set_defaults(func=_serve)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may sit between flags; argparse only takes one run of positionals, so collect the rest.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or args.command not in ("train", "sample")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides = list(args.overrides) + extra
    if args.command == "sample":
        args.options = list(args.options) + extra
    try:
        args.func(args)
    except JumpflowError as e:
        print(f"jumpflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jumpflow: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
