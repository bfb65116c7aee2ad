"""
Talk to a chat model in the terminal: multi-turn with streamed replies, or one question with -p.

    python -m scripts.chat_cli                    # the latest SFT model
    python -m scripts.chat_cli -i mid -p "Why is the sky blue?"

Commands inside the chat: 'quit' or Ctrl-D ends it, 'clear' starts a new conversation.
"""

import argparse
import sys

import torch

from nanochat.checkpoint import add_checkpoint_args, load_model
from nanochat.common import autocast_ctx, autodetect_device_type, parse_dtype
from nanochat.engine import Engine, Utf8Stream


def main(argv=None):
    p = argparse.ArgumentParser(description="Chat with a trained model in the terminal.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="sft")
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer, exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error("--temperature and --top-k must be >= 0 and --max-tokens >= 1")

    device_type = args.device_type or autodetect_device_type()
    device = torch.device(device_type)
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, tokenizer)
    autocast = autocast_ctx(device_type, parse_dtype(args.dtype, device_type))
    messages = []
    seed = args.seed

    def reply(question):
        nonlocal seed
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
        stream, pieces = Utf8Stream(tokenizer), []
        with autocast:
            for column, _ in engine.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                             top_k=args.top_k, seed=seed):
                token = column[0]
                if token is None:
                    break
                text = stream.push(token)
                pieces.append(text)
                print(text, end="", flush=True)
        tail = stream.flush()
        print(tail, flush=True)
        seed += 1  # a new draw next turn, still reproducible from --seed
        messages.append({"role": "assistant", "content": "".join(pieces) + tail})

    if args.prompt is not None:
        reply(args.prompt)
        return 0
    print(f"nanochat ({args.source} model, step {meta['step']}). 'quit' to exit, 'clear' for a new chat.")
    while True:
        try:
            question = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if question.lower() in ("quit", "exit"):
            return 0
        if question.lower() == "clear":
            messages.clear()
            print("(new conversation)")
            continue
        if not question:
            continue
        print("\nAssistant: ", end="", flush=True)
        reply(question)


if __name__ == "__main__":
    sys.exit(main())
