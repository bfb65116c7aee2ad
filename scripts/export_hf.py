"""
Export a checkpoint as a HuggingFace transformers NanoChat model folder, or as an MLX-LM folder.

    python -m scripts.export_hf -i sft --out hf_model/
    # then, with no custom code:
    #   AutoModelForCausalLM.from_pretrained("hf_model"); AutoTokenizer.from_pretrained("hf_model")
    #   vllm serve hf_model --model-impl transformers --dtype float32
    python -m scripts.export_hf -i sft --format mlx --out mlx_model/
    #   mlx_lm.generate --model mlx_model --prompt "Why is the sky blue?"   (a Mac, or Linux with mlx[cpu])

Writes config.json, model.safetensors (fp32, the real vocabulary: padding rows removed),
generation_config.json, tokenizer.json and tokenizer_config.json (byte-level BPE with our merges,
split regex, special tokens and a chat template that renders conversations exactly as
render_conversation). --format hf names the weights as transformers' NanoChatForCausalLM does;
--format mlx keeps our own names and writes the config fields mlx_lm's `nanochat` model reads. See
nanochat/hf_format.py for the mapping. A model whose parameters do not match the NanoChat
architecture is refused with the reason: one trained with an architecture flag of base_train other than
--rope-base (which exports as rope_theta) gets one line naming the fields it uses and the flags to leave out.
"""

import argparse

from nanochat.checkpoint import SOURCES, load_model
from nanochat.hf_format import NotExportable, export_folder


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint as a transformers NanoChat folder (or an MLX-LM one).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=list(SOURCES), help="which stage's checkpoint")
    p.add_argument("--model-tag", default=None, help="default: the largest model of that stage")
    p.add_argument("--step", type=int, default=None, help="default: the last step")
    p.add_argument("--format", default="hf", choices=["hf", "mlx"],
                   help="hf: transformers, vLLM, SGLang; mlx: mlx_lm (its nanochat model type)")
    p.add_argument("--out", required=True, help="the folder to write (created if missing)")
    args = p.parse_args(argv)
    try:
        model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
        export_folder(model, tokenizer, args.out, folder_format=args.format)
    except (FileNotFoundError, NotExportable) as e:
        raise SystemExit(f"error: {e}")
    print(f"exported {args.source} step {meta['step']} ({model.num_params():,} parameters, vocabulary {model.config.vocab_size}) "
          f"as a {args.format} folder to {args.out}")


if __name__ == "__main__":
    main()
