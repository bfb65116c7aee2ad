"""
Import a HuggingFace transformers NanoChat model folder as one of our checkpoints.

    python -m scripts.import_hf path/to/hf_folder -i sft --model-tag imported
    python -m scripts.chat_cli -i sft --model-tag imported

The folder needs config.json, model.safetensors and tokenizer.json (byte-level BPE whose ids are
the ranks, with our special tokens, as scripts.export_hf writes and public nanochat exports use).
The tokenizer goes to $NANOCHAT_BASE_DIR/tokenizer: if a different one is already there, the
import stops (use a fresh NANOCHAT_BASE_DIR, or --replace-tokenizer when nothing else uses it).
"""

import argparse
import os

from nanochat.checkpoint import SOURCES, save_checkpoint
from nanochat.common import get_base_dir
from nanochat.gpt import GPT
from nanochat.hf_format import NotExportable, import_folder
from nanochat.tokenizer import RustBPETokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Import a transformers NanoChat folder as a nanochat checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", help="the transformers model folder")
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="the stage to file it under")
    p.add_argument("--model-tag", default="imported", help="checkpoint tag")
    p.add_argument("--step", type=int, default=0, help="step number to record")
    p.add_argument("--replace-tokenizer", action="store_true", help="overwrite a different tokenizer in the base dir")
    args = p.parse_args(argv)
    try:
        state, config, tokenizer = import_folder(args.folder)
    except (FileNotFoundError, NotExportable) as e:
        raise SystemExit(f"error: {e}")
    tok_dir = os.path.join(get_base_dir(), "tokenizer")
    try:
        existing = RustBPETokenizer.from_directory(tok_dir)
    except FileNotFoundError:
        existing = None
    if existing is not None and existing.fingerprint() != tokenizer.fingerprint() and not args.replace_tokenizer:
        raise SystemExit(f"error: {tok_dir} holds a different tokenizer, which the checkpoints there were trained "
                         f"with; use a fresh NANOCHAT_BASE_DIR or pass --replace-tokenizer")
    if existing is None or existing.fingerprint() != tokenizer.fingerprint():
        tokenizer.save(tok_dir)
    model = GPT(config)
    model.load_state_dict(state, strict=True)
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[args.source], args.model_tag)
    save_checkpoint(checkpoint_dir, args.step, model, [], {"model_config": vars(config), "imported_from":
                                                            os.path.abspath(args.folder)})
    print(f"imported {args.folder} -> {checkpoint_dir} step {args.step} ({model.num_params():,} parameters)")


if __name__ == "__main__":
    main()
