"""``fdistill convert-edm``: an NVlabs EDM network pickle -> a diffusers UNet2DModel folder, without executing
the pickle (``fdistill.convert.edm``)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..convert.edm import PRECOND_FILE, convert_edm
from ..convert.safe_pickle import UnsafePickleError
from . import USER_ERRORS, call


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdistill convert-edm",
        description=(
            "Convert an NVlabs EDM ADM checkpoint (e.g. edm-imagenet-64x64-cond-adm.pkl) into a diffusers "
            "UNet2DModel folder usable as an fdistill teacher. The pickle is read with a restricted unpickler: "
            "the class source EDM embeds in its pickles is never executed, and a pickle that asks for anything "
            "besides tensors and plain containers is refused. A state dict with EDM parameter names "
            "(.pth/.pt/.safetensors) is accepted too. The output holds config.json, "
            f"diffusion_pytorch_model.safetensors and {PRECOND_FILE} (EDM preconditioning: sigma_data, sigma range, "
            "c_noise = log(sigma)/4 fed to the UNet as its timestep)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Load it back with fdistill.convert.edm.load_converted(OUT_DIR) -> (unet, precond).")
    p.add_argument("src", metavar="PKL_OR_STATE_DICT", help="EDM network pickle (.pkl), torch checkpoint "
                   "(.pt/.pth) or safetensors state dict with EDM parameter names")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (must not exist or be empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # a pickle that would run code when loaded is refused with its own exit code
    rec, rc = call("fdistill convert-edm", convert_edm, args.src, args.out_dir, force=args.force,
                   errors=(*USER_ERRORS, UnsafePickleError), codes={UnsafePickleError: 3})
    if rc:
        return rc
    cond = f"{rec['label_dim']} classes" if rec["label_dim"] else "unconditional"
    print(f"wrote {args.out_dir}: ADM UNet2DModel {rec['resolution']}x{rec['resolution']}, {cond}, "
          f"EDM preconditioning sigma_data={rec['sigma_data']}"
          + (f"; dropped (training-only): {', '.join(rec['dropped_keys'])}" if rec["dropped_keys"] else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
