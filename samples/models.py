"""Small local models for the sample data (no downloads, deterministic, seconds).

Built under ``<out_dir>/models/`` (``data/sample/models/`` for the examples):

- ``fasttext_quality.bin`` — fastText classifier, labels ``__label__hq`` /
  ``__label__lq`` (well-formed sample prose vs. word salad and spam);
- ``fasttext_mmlu.bin`` — fastText classifier, labels ``__label__mmlu`` /
  ``__label__other`` (exam-style multiple-choice questions vs. prose);
- ``tokenizer/`` — a byte-level BPE tokenizer in Hugging Face format
  (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``;
  loadable with ``tokenizers.Tokenizer.from_file`` and with transformers'
  ``AutoTokenizer.from_pretrained``); it adds ``<s>`` in front of every text;
- ``seq_classifier/`` — a tiny randomly initialised BERT sequence classifier
  (2 labels) with that tokenizer, in Hugging Face format; only when torch and
  transformers (the ``models`` extra) are installed.

Each model is built only when its library is installed (``fasttext`` /
``tokenizers`` extras). ``python -m samples.models [--out data/sample]``
rebuilds them alone (``python -m samples.data`` builds them with the data).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile

import numpy as np

from samples.text import EN_WORDS, TextMaker

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
SPAM_EN = "click here buy now free cheap deal best price discount casino viagra winner prize limited offer subscribe".split()
SPAM_ZH = ["加微信了解更多优惠", "专业治疗牛皮癣祖传秘方", "点击这里免费领取", "特价包邮限时抢购", "关注公众号回复领取"]
SUBJECTS = "physics chemistry biology history economics law philosophy mathematics computer science medicine".split()


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _corpora(seed: int, n: int = 3000) -> dict[str, list[str]]:
    rng = np.random.default_rng([seed, 7])
    maker = TextMaker(seed)
    prose = maker.docs(rng, n, "en", 2, 8) + maker.docs(rng, n // 3, "zh", 2, 8)
    junk = []
    for _ in range(n):
        words = [EN_WORDS[i] for i in rng.integers(0, len(EN_WORDS), size=int(rng.integers(3, 12)))]
        words += [SPAM_EN[i] for i in rng.integers(0, len(SPAM_EN), size=int(rng.integers(2, 8)))]
        rng.shuffle(words)
        text = " ".join(words) + "!" * int(rng.integers(0, 5))
        if rng.random() < 0.3:
            text = SPAM_ZH[int(rng.integers(0, len(SPAM_ZH)))] + " " + text
        junk.append(text)
    questions = []
    for _ in range(n):
        w = [EN_WORDS[i] for i in rng.integers(0, len(EN_WORDS), size=12)]
        subject = SUBJECTS[int(rng.integers(0, len(SUBJECTS)))]
        questions.append(
            f"Question: In {subject}, which of the following best describes the {w[0]} of {w[1]} {w[2]}? "
            f"A. {w[3]} {w[4]} B. {w[5]} {w[6]} C. {w[7]} {w[8]} D. {w[9]} {w[10]} Answer: {'ABCD'[int(rng.integers(0, 4))]}"
        )
    return {"prose": prose, "junk": junk, "questions": questions}


def _train_fasttext(path: str, examples: list[tuple[str, str]], seed: int) -> str:
    import fasttext

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as fh:
        for label, text in examples:
            fh.write(f"__label__{label} {text.replace(chr(10), ' ').lower()}\n")
        train_file = fh.name
    try:
        model = fasttext.train_supervised(
            input=train_file, dim=16, epoch=5, lr=0.1, wordNgrams=2, bucket=20000, minCount=1,
            thread=1, seed=seed, verbose=0,
        )
    finally:
        os.unlink(train_file)
    tmp = path + ".tmp"
    model.save_model(tmp)
    os.replace(tmp, path)
    return path


def build_fasttext(models_dir: str, seed: int, corpora: dict[str, list[str]]) -> list[str]:
    quality = [("hq", t) for t in corpora["prose"]] + [("lq", t) for t in corpora["junk"]]
    mmlu = [("mmlu", t) for t in corpora["questions"]] + [("other", t) for t in corpora["prose"][: len(corpora["questions"])]]
    rng = np.random.default_rng(seed)
    quality = [quality[i] for i in rng.permutation(len(quality))]
    mmlu = [mmlu[i] for i in rng.permutation(len(mmlu))]
    return [
        _train_fasttext(os.path.join(models_dir, "fasttext_quality.bin"), quality, seed),
        _train_fasttext(os.path.join(models_dir, "fasttext_mmlu.bin"), mmlu, seed),
    ]


def build_tokenizer(models_dir: str, corpora: dict[str, list[str]], vocab_size: int = 2000) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpora["prose"] + corpora["questions"], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    out = os.path.join(models_dir, "tokenizer")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(tmp, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_seq_classifier(models_dir: str, tokenizer_dir: str, seed: int) -> str:
    import torch
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, type_vocab_size=2, num_labels=2, pad_token_id=0,
    )
    model = BertForSequenceClassification(config).eval()
    out = os.path.join(models_dir, "seq_classifier")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def build_all(out_dir: str = "data/sample", seed: int = 0) -> list[str]:
    """Build every sample model whose library is installed; return the paths."""
    models_dir = os.path.join(out_dir, "models")
    os.makedirs(models_dir, exist_ok=True)
    corpora = _corpora(seed)
    built: list[str] = []
    if _have("fasttext"):
        built += build_fasttext(models_dir, seed, corpora)
    if _have("tokenizers"):
        tokenizer_dir = build_tokenizer(models_dir, corpora)
        built.append(tokenizer_dir)
        if _have("torch") and _have("transformers"):
            built.append(build_seq_classifier(models_dir, tokenizer_dir, seed))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in build_all(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
