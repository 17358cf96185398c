"""Command line: `python -m decmem_jax.convert <model> ...` converts PyTorch checkpoints to JAX/Orbax directories.

Each subcommand is one entry of COMMANDS: a function that adds its arguments to a subparser and a function that runs
it. Input problems (missing or unreadable files, key/shape mismatches, an occupied or unwritable destination) exit
with status 2 and a message starting `error: <file or argument>:`, without a traceback; the destination is checked
before the source is read.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from decmem_jax import cli
from decmem_jax.convert import keymap
from decmem_jax.convert.sources import SUBKEY_PREFERENCE

DESCRIPTION = ("Convert PyTorch checkpoints of the Wan2.1 models (dit: diffusion transformer, vae: video VAE) into "
               "Orbax checkpoints loadable in one call.")

DIT_HELP = textwrap.dedent("""\
    Convert a Wan2.1 diffusion transformer (DiT) checkpoint. Load the result with
    decmem_jax.convert.dit.load_dit(DST).

    Accepted --src inputs:
      FILE.safetensors              one file (fp32/fp16/bf16), e.g. Wan-AI/Wan2.1-T2V-1.3B's
                                    diffusion_pytorch_model.safetensors
      FILE.safetensors.index.json   sharded safetensors; the shards must sit next to the index
      DIR                           a directory holding diffusion_pytorch_model.safetensors[.index.json],
                                    or a diffusers repository root with a transformer/ subfolder
                                    (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
      FILE.pt|.pth|.bin|.ckpt       a PyTorch pickle (loaded with weights_only=True), including
                                    CausVid / Self-Forcing training checkpoints that nest several
                                    state dicts ({"generator": ..., "generator_ema": ..., "critic": ...})

    Key layouts: 'original' (Wan2.1 WanModel names, also CausVid / Self-Forcing) and 'diffusers'
    (WanTransformer3DModel names); 'auto' decides from the key names. Wrapper prefixes (model.,
    generator., generator_ema., module.) and infixes (_fsdp_wrapped_module., ...) are stripped.

    DST becomes a directory with config.json, conversion.json and params/ (Orbax). It is written to a
    temporary directory first and renamed at the end; a failed conversion leaves nothing behind.
    Every missing, unexpected or mis-shaped key is reported together (exit status 2).""")


def _add_dit(sub: argparse._SubParsersAction) -> None:
    from decmem_jax.models.config import PRESETS

    p = sub.add_parser("dit", help="Wan2.1 diffusion transformer (WanModel / WanTransformer3DModel)",
                       description=DIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="FILE_OR_DIR", help="checkpoint file or directory (see above)")
    p.add_argument("--dst", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--layout", default="auto", choices=["auto", *keymap.TABLES],
                   help="key naming of the source (default: %(default)s)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                   help="storage dtype of the converted weights (default: %(default)s)")
    p.add_argument("--config", default="wan2.1-t2v-1.3b", choices=sorted(PRESETS),
                   help="architecture preset the checkpoint must match (default: %(default)s)")
    p.add_argument("--subkey", default="auto", metavar="NAME",
                   help="nested state dict of a training checkpoint to convert: 'auto' picks the first present "
                        f"of {', '.join(SUBKEY_PREFERENCE)}, else the whole file; or name one, e.g. generator "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_dit(args: argparse.Namespace) -> int:
    from decmem_jax.convert.dit import convert_dit

    dst = convert_dit(args.src, args.dst, layout=args.layout, dtype=args.dtype, config=args.config,
                      subkey=args.subkey, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {dst}")
    return 0


VAE_HELP = textwrap.dedent("""\
    Convert a Wan2.1 VAE checkpoint (Wan's WanVAE_ / diffusers' AutoencoderKLWan). Load the result
    with decmem_jax.convert.vae.load_vae(DST).

    Accepted --src inputs:
      Wan2.1_VAE.pth                the original VAE, a plain PyTorch state dict (loaded with
                                    weights_only=True), e.g. from Wan-AI/Wan2.1-T2V-1.3B; a directory
                                    holding Wan2.1_VAE.pth means that file
      DIR                           diffusers weights: a vae/ directory holding
                                    diffusion_pytorch_model.safetensors, or a diffusers repository root
                                    with a vae/ subfolder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)
      FILE.safetensors              one file (fp32/fp16/bf16) in either key layout

    Key layouts: 'original' (Wan2.1_VAE.pth names: encoder.downsamples.N, decoder.upsamples.N,
    middle.*, head.*, conv1/conv2) and 'diffusers' (down_blocks, up_blocks.I.resnets.J, mid_block,
    norm_out/conv_out, quant_conv/post_quant_conv); 'auto' decides from the key names.

    DST becomes a directory with config.json, conversion.json and params/ (Orbax). It is written to a
    temporary directory first and renamed at the end; a failed conversion leaves nothing behind.
    Every missing, unexpected or mis-shaped key is reported together (exit status 2).""")


def _add_vae(sub: argparse._SubParsersAction) -> None:
    from decmem_jax.convert.vae_keymap import LAYOUTS
    from decmem_jax.models.vae import VAE_PRESETS

    p = sub.add_parser("vae", help="Wan2.1 VAE (Wan2.1_VAE.pth / AutoencoderKLWan)", description=VAE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="FILE_OR_DIR", help="checkpoint file or directory (see above)")
    p.add_argument("--dst", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    p.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS],
                   help="key naming of the source (default: %(default)s)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                   help="storage dtype of the converted weights (default: %(default)s)")
    p.add_argument("--config", default="wan2.1-vae", choices=sorted(VAE_PRESETS),
                   help="architecture preset the checkpoint must match (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_vae(args: argparse.Namespace) -> int:
    from decmem_jax.convert.vae import convert_vae

    dst = convert_vae(args.src, args.dst, layout=args.layout, dtype=args.dtype, config=args.config,
                      overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {dst}")
    return 0


# name -> (add arguments, run). A new model adds one entry here.
COMMANDS = {"dit": (_add_dit, _run_dit), "vae": (_add_vae, _run_vae)}


def _input_errors() -> tuple[type[BaseException], ...]:
    from decmem_jax.errors import DecMemError

    return (DecMemError, FileNotFoundError)  # the project's errors (mismatch, source, destination) and a missing file


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m decmem_jax.convert", description=DESCRIPTION,
                                epilog="Run `python -m decmem_jax.convert <model> --help` for the inputs a model "
                                       "accepts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<model>")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except _input_errors() as e:
        hint = ""
        if isinstance(e, keymap.CheckpointMismatch):
            hint = "\nhint: --config must name the checkpoint's architecture; --layout forces a key naming."
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
