"""The embedded default model: a tiny random-weight Llama and its tokenizer, generated locally.

`inference-cluster serve` with no model needs something vLLM can load without network access, so
we generate one: a byte-level BPE tokenizer trained on a built-in corpus, and a Llama with random
weights (its text is random; the serving path it takes is the real one). Generation is
deterministic, so every machine and every replica serves the same model, and it happens once per
recipe: the folder name carries RECIPE_VERSION, so changing the recipe regenerates it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Bump whenever anything below changes what gets written: the folder name carries it, so old
# caches are never served for a new recipe.
RECIPE_VERSION = "v1"
MODEL_DIR_NAME = f"embedded-llama-{RECIPE_VERSION}"
CACHE_ENV = "INFERENCE_CLUSTER_CACHE"
COMPLETE_MARKER = ".complete"

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2.
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TARGET_VOCAB_SIZE = 4096
SEED = 0
# head_dim must be 64: vLLM CPU has no attention kernel for smaller heads (DESIGN.md).
HIDDEN_SIZE = 256
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 768
MAX_POSITION_EMBEDDINGS = 4096

# The corpus vocabulary: common English plus the words this project talks in.
_WORD_TEXT = """
the of and to in is it that for on with as was by at be this from have or not are an which they one
you all were her his there been has when their who will more no if out so said what up its about
than into them can only other new some could time these two may then do first any my now such like
our over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three states himself few
house use during without again place american around however home small found thought went say part
once general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet government
system better set told nothing night end why called eyes find going look asked later knew point
next city business give group toward young days let room president side social given present
several order national possible rather second face per among form important often things looked
early white case john become large big need four within felt along children saw best church ever
least power development light seemed family interest want members mind country area others done
turned although open god service problem certain kind thing began different door thus help sense
means whole matter perhaps itself york times law human line above name example action company hands
local show five history whether gave either act feel today across quite taken anything seen having
body past fire music model token cache block prefix router replica engine request stream batch
queue latency throughput cluster node worker tensor pipeline parallel memory kernel attention layer
vector matrix query key value hash score policy metric sample random seed user assistant system
role content message hello answer question
"""

_PARAGRAPHS = (
    "A request arrives at the router, which tokenizes the prompt and hashes its blocks.",
    "The replica that already holds the longest cached prefix usually answers first.",
    "When every replica is busy, the autoscaler adds one; when they idle, it removes one.",
    "Numbers such as 0, 1, 2, 3, 42, 128, 2048 and 3.14 appear in text, code and logs.",
    "def generate(prompt: str) -> str:\n    return model(prompt)\n",
    '{"model": "embedded", "messages": [{"role": "user", "content": "Hello!"}]}',
    "Questions? Answers! Lists: one, two; three - four. (Brackets) [and] {braces}.",
)


def default_cache_dir() -> Path:
    """`$INFERENCE_CLUSTER_CACHE`, else ~/.cache/inference-cluster."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "inference-cluster"


def ensure_embedded_model(cache_dir: Path | None = None) -> Path:
    """Return the folder of the embedded model, generating it first if needed.

    Safe to call from many processes at once: one builds while the others wait on a file lock,
    and a folder only ever appears complete (built aside, then renamed into place).
    """
    root = (cache_dir or default_cache_dir()).expanduser().resolve()
    target = root / MODEL_DIR_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{MODEL_DIR_NAME}.lock"):
        if (target / COMPLETE_MARKER).is_file():
            return target
        # Only the lock holder builds, so any temp folder left here is from a crashed build.
        for stale in root.glob(f".{MODEL_DIR_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=root))
        try:
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared
            _build(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(folder: Path) -> None:
    tokenizer = _train_tokenizer()
    _save_tokenizer(tokenizer, folder)
    _save_model(tokenizer.get_vocab_size(), folder)
    digests = {}
    for path in sorted(folder.iterdir()):
        path.chmod(0o644)  # safetensors writes owner-only files; the cache is shared
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    # Written last: its presence is what says the folder is complete.
    (folder / COMPLETE_MARKER).write_text(
        json.dumps({"recipe": RECIPE_VERSION, "sha256": digests}, indent=2) + "\n"
    )


def _corpus() -> Iterator[str]:
    rng = random.Random(SEED)
    vocabulary = _WORD_TEXT.split()
    yield from _PARAGRAPHS
    for _ in range(4000):
        words = rng.choices(vocabulary, k=rng.randint(4, 16))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        yield " ".join(words) + rng.choice((".", ".", "?", "!", ",", ":", "\n"))


def _train_tokenizer() -> Tokenizer:
    # Imported here, not at module level: `import cluster` must stay light.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte gets a token, so any text round-trips even though the corpus is English.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    # Written by hand rather than by transformers' save_pretrained: transformers 5 would record
    # its own class name (TokenizersBackend) and split the template into chat_template.jinja,
    # which transformers 4 (still common in GPU images) cannot load.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": BOS_TOKEN,
        "additional_special_tokens": [IM_START],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _save_model(vocab_size: int, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos_id, eos_id = SPECIAL_TOKENS.index(BOS_TOKEN), SPECIAL_TOKENS.index(IM_END)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        num_hidden_layers=NUM_LAYERS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
        tie_word_embeddings=False,
        # bfloat16 is what vLLM CPU would downcast float32 weights to anyway; it halves the file.
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=bos_id).save_pretrained(
        folder
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # safetensors directly rather than model.save_pretrained: same file, without its progress bar.
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    print(ensure_embedded_model())
