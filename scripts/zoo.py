"""The zoo table (issue 12): stock diffusers models at tiny configs through diffopt, next to eager.

    python scripts/zoo.py                      # every model of diffopt.models.zoo.ZOO
    python scripts/zoo.py flux wan             # some of them
    python scripts/zoo.py --model pkg.mod:fn   # your own: fn(torch.Generator) -> (model, kwargs)
    python scripts/zoo.py --dtype bfloat16 --inductor

Prints one row per model: the forms its attention has (zoo entries only), how often qk_norm_rope
fired, max |compiled - eager| over max |eager|, and why the pass declined where it did.
"""
import argparse
import logging
import warnings

import torch

from diffopt.models import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="zoo models (default: all)")
    parser.add_argument("--model", action="append", default=[], help="module:function building (model, kwargs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--inductor", action="store_true", help="hand the rewritten graph to Inductor")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffopt").setLevel(logging.ERROR)
    specs = args.names + args.model or list(zoo.ZOO)
    print(f"{'model':24s} {'forms':22s} {'fired':>5s} {'error':>9s}  declined")
    for spec in specs:
        forms = ",".join(zoo.ZOO[spec].forms) if spec in zoo.ZOO else "?"
        model, kwargs = zoo.load(spec)(torch.Generator().manual_seed(0))
        row = zoo.check(model, kwargs, getattr(torch, args.dtype), args.inductor)
        notes = "; ".join(row["declined"]) + ("; RAISED: " + "; ".join(row["raised"]) if row["raised"] else "")
        print(f"{spec:24s} {forms:22s} {row['fired']:5d} {row['error']:9.2e}  {notes}", flush=True)


if __name__ == "__main__":
    main()
