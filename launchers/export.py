"""``python launchers/export.py RUN_DIR --out DIR``: a run's weights as a folder that timm loads by itself.

DIR holds timm's local-dir format: ``config.json`` (architecture, class count, image size, head, eval transform)
and ``model.safetensors`` (fp32). Nothing else is needed to use it:

    import pipeline.models, timm                                    # registers sovit_*
    model = timm.create_model("local-dir:DIR", pretrained=True)     # pretrained=True loads the weights
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    python launchers/evaluate.py --checkpoint DIR --data VAL

``--out FILE.safetensors`` (or ``--format safetensors``) writes one file carrying the same config in its header,
as training's ``best.safetensors`` does. The checkpoint read is the one ``latest`` names, or ``--tag``; an unreadable
newest checkpoint is an error naming the newest one that reads (never a silent older export). ZeRO 1-3 shards are
consolidated into the fp32 master weights; ``--ema`` exports the EMA weights. A checkpoint file holding anything
but tensors and DeepSpeed's own state is refused unopened. Exit codes: 0 written, 2 one ``error:`` line (bad run
directory, checkpoint or output path, or a full disk).
"""

from __future__ import annotations

import sys
from pathlib import Path

from launchers import parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.runtime import paths_as_bytes  # the standard library only: --help stays instant

    p = parser("launchers/export.py", __doc__)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by launchers/train.py")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (or FILE.safetensors); missing parent folders are created")
    p.add_argument("--format", choices=["local-dir", "safetensors"],
                   help="default: safetensors when --out ends in .safetensors, else local-dir")
    p.add_argument("--tag", help="checkpoint tag, e.g. step_00001200 (default: the newest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    a = p.parse_args(argv)
    paths_as_bytes()
    fmt = a.format or ("safetensors" if a.out.suffix == ".safetensors" else "local-dir")

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if not (a.run_dir / "config.yaml").is_file():
        return fail(f"{a.run_dir} is not a run directory (no config.yaml): pass the checkpoint.run_dir of a run")

    from data_loaders.errors import SovitError
    from pipeline import export
    from pipeline.config import load_config

    try:
        cfg = load_config([a.run_dir / "config.yaml"])
        state_dict = export.consolidated_state_dict(a.run_dir, a.tag, a.ema)
        a.out.parent.mkdir(parents=True, exist_ok=True)  # once the weights are read: a bad run leaves no folders
        (export.save_local_dir if fmt == "local-dir" else export.save_safetensors)(state_dict, cfg, a.out)
    except SovitError as e:
        return fail(str(e))
    except OSError as e:  # the output could not be written: an existing folder of other files, disk full, ...
        return fail(f"could not write {a.out}: {e}")
    m = cfg.model
    print(f"wrote {a.out} ({fmt}): {m.arch}, {m.num_classes} classes, {m.img_size} px, head {m.head!r}, "
          f"{'EMA' if a.ema else 'model'} weights, {sum(v.numel() for v in state_dict.values()) / 1e6:.2f} M values")
    if fmt == "local-dir":
        print(f'load it with: import pipeline.models, timm; timm.create_model("local-dir:{a.out}", pretrained=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
