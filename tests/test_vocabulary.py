"""The built-in word tokenizer's vocabulary is saved with every checkpoint: token ids are positions in the
shapes world's sorted words, so a word added to that world later would shift every id after it. Loading,
resuming and train.init_from read the saved list instead of the current code's."""

import json

import pytest
import torch

from conftest import TINY_CLIP_ARCH, tiny_config
from fusedit.checkpoints import VOCABULARY_FILE, find_checkpoint, load_model, saved_vocabulary
from fusedit.config import ConfigError
from fusedit.system import build_model, builtin_words, uses_builtin_tokenizer
from fusedit.train.checkpoint import init_weights
from fusedit.train.loop import train


def _shift_words(monkeypatch):
    """The shapes world as if a word sorting before all others had been added: every id moves by one."""
    from fusedit.data import shapes

    words = shapes.vocabulary()
    monkeypatch.setattr(shapes, "vocabulary", lambda: ["aaa", *words])


def _ids(model, text="a red circle"):
    return model.text.tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny run (checkpoints at 1 and 2) and its loss at step 2."""
    cfg = tiny_config(train={"steps": 2, "checkpoint_every": 1})
    root = tmp_path_factory.mktemp("vocab") / "run"
    return cfg, root, train(cfg, root, progress=False)["losses"]


def test_checkpoints_save_the_words_the_model_was_built_with(run):
    cfg, root, _ = run
    saved = saved_vocabulary(find_checkpoint(root))
    assert saved == builtin_words(cfg)
    assert json.loads((find_checkpoint(root) / VOCABULARY_FILE).read_text()) == saved


def test_loading_keeps_the_saved_ids_when_the_words_of_the_code_change(run, monkeypatch):
    _, root, _ = run
    before, _, _ = load_model(root)
    _shift_words(monkeypatch)
    after, _, _ = load_model(root)
    assert _ids(after) == _ids(before)
    assert after.vocabulary == before.vocabulary
    # A new model built from the changed code has other ids: the saved list is what kept them.
    assert _ids(build_model(tiny_config())) != _ids(before)


def test_a_checkpoint_written_before_the_list_loads_with_the_current_words(run, tmp_path, monkeypatch):
    import shutil

    _, root, _ = run
    old = tmp_path / "old"
    shutil.copytree(root, old)
    (find_checkpoint(old) / VOCABULARY_FILE).unlink()
    assert saved_vocabulary(find_checkpoint(old)) is None
    _shift_words(monkeypatch)
    model, _, _ = load_model(old)
    assert model.vocabulary[0] == "aaa"


def test_resume_after_the_words_changed_continues_exactly(run, tmp_path, monkeypatch):
    cfg, _, full = run
    train(cfg, tmp_path / "b", stop_at=1, progress=False)
    _shift_words(monkeypatch)
    rest = train(cfg, tmp_path / "b", resume=True, progress=False)["losses"]
    assert rest == full[1:]
    assert saved_vocabulary(find_checkpoint(tmp_path / "b"))[0] != "aaa"


def test_init_from_a_run_with_other_words_of_the_same_count_is_refused(run, tmp_path):
    import shutil

    cfg, root, _ = run
    other = tmp_path / "other"
    shutil.copytree(root, other)
    words = saved_vocabulary(find_checkpoint(other))
    words[5], words[6] = words[6], words[5]  # same size: every weight shape still fits
    (find_checkpoint(other) / VOCABULARY_FILE).write_text(json.dumps(words))
    model = build_model(cfg)
    weights = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    with pytest.raises(ConfigError, match=r"differ from this model's at position 5 \(.*token ids mean other"):
        init_weights(model, other)
    assert all(
        torch.equal(v, model.denoiser.state_dict()[k]) for k, v in weights.items()
    )  # refused: untouched
    assert init_weights(model, root) == find_checkpoint(root)  # the same words load


def test_a_corrupt_list_is_a_one_line_error(run, tmp_path):
    import shutil

    _, root, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    (find_checkpoint(bad) / VOCABULARY_FILE).write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"vocabulary.json' is not a JSON list of words"):
        load_model(bad)


def test_only_models_with_a_built_in_tokenizer_have_a_vocabulary(tmp_path):
    assert uses_builtin_tokenizer(tiny_config())
    assert not uses_builtin_tokenizer(tiny_config(text={"tokenizer": str(tmp_path)}))
    # The clip-mod CLIP without a tokenizer of its own uses the built-in one too.
    clip = {"model": {"pooled_text": "clip"}, "text": {"tokenizer": str(tmp_path)}}
    assert uses_builtin_tokenizer(tiny_config(**clip, pooled_text={"arch": TINY_CLIP_ARCH}))
    own = {"arch": TINY_CLIP_ARCH, "tokenizer": str(tmp_path)}
    assert not uses_builtin_tokenizer(tiny_config(**clip, pooled_text=own))


def test_init_from_a_pipeline_whose_tokenizer_has_other_words_of_the_same_count_is_refused(run, tmp_path):
    from fusedit.pipeline import save_pretrained

    cfg, root, _ = run
    source, saved_cfg, _ = load_model(root)
    pipe = save_pretrained(source, saved_cfg, tmp_path / "pipe")
    words = list(source.vocabulary)
    words[5], words[6] = words[6], words[5]  # same size: every weight shape still fits
    model = build_model(cfg, vocabulary=words)
    weights = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    # Position 9 = the 4 specials + word 5: a pipeline's tokenizer is compared id by id.
    with pytest.raises(
        ConfigError,
        match=r"its tokenizer/ folder's tokens \(in id order\) differ from this model's at position 9",
    ):
        init_weights(model, pipe)
    assert all(torch.equal(v, model.denoiser.state_dict()[k]) for k, v in weights.items())
    assert init_weights(build_model(cfg), pipe) == pipe  # the same words load


# ---- Case and punctuation (helper-115 B2): known words stay known, every id they had is kept


def _plain(tokenizer):
    """The same word tokenizer without its normalizer: what every run tokenized with before it had one."""
    import copy

    old = copy.deepcopy(tokenizer)
    old.backend_tokenizer.normalizer = None
    return old


def test_case_and_punctuation_leave_known_words_known():
    from fusedit.config import load_config
    from fusedit.text.tokenizer import word_tokenizer

    tok = word_tokenizer(builtin_words(load_config("debug")))

    def tokens(text):
        return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])

    assert tokens("A Red Circle.") == tokens("a red circle") == ["a", "red", "circle"]
    assert tokens("Two BLUE squares!! above a red circle...") == tokens("two blue squares above a red circle")
    assert tokens("red.blue") == ["red", "blue"]  # a dropped mark still separates words
    # A token as written keeps its id: the LI-DiT instruction's capitalised word and its punctuation.
    assert tokens("Describe the color, shape:") == ["Describe", "the", "color", ",", "shape", ":"]
    assert tokens("describe") == ["<unk>"]  # a lowercase prompt's ids are never changed
    assert tokens("an Astronaut") == ["an", "<unk>"]


def test_every_shapes_caption_and_template_keeps_the_ids_it_had(run):
    """The captions training reads and the templates' words tokenize exactly as without the normalizer, so
    a run's loss and a saved run's images do not change."""
    from fusedit.data.shapes import all_prompts
    from fusedit.text.templates import LIDIT_INSTRUCTION
    from fusedit.text.tokenizer import word_tokenizer

    cfg = tiny_config(text={"instruction": "Imagine, then draw: "})
    tok = word_tokenizer(builtin_words(cfg))
    old = _plain(tok)
    texts = [p.text for p in all_prompts()] + [LIDIT_INSTRUCTION, "Imagine, then draw: ", "a , : b"]
    assert tok(texts)["input_ids"] == old(texts)["input_ids"]
    assert tok("Imagine, THEN Draw.")["input_ids"] == old("Imagine, then draw")["input_ids"]
    # A saved run rebuilds its tokenizer in code: it reads capitals and a full stop as its words too.
    model, _, _ = load_model(run[1])
    assert _ids(model, "A Red Circle.") == _ids(model, "a red circle")


def test_the_training_loss_is_the_one_without_the_normalizer(run, tmp_path, monkeypatch):
    from tokenizers import normalizers

    from fusedit.text import tokenizer

    cfg, _, losses = run
    monkeypatch.setattr(tokenizer, "word_normalizer", lambda vocabulary: normalizers.Sequence([]))
    assert train(cfg, tmp_path / "plain", progress=False)["losses"] == losses


def test_unknown_words_are_named_as_written():
    from fusedit.text.tokenizer import unknown_words, word_tokenizer

    tok = word_tokenizer(["a", "red", "circle"])
    assert unknown_words(tok, ["An Astronaut, riding a red HORSE.", "a red horse", "红色的圆"]) == [
        "An",
        "Astronaut",
        "riding",
        "HORSE",
        "horse",
        "红色的圆",
    ]
    assert unknown_words(tok, ["A Red Circle!", ""]) == []
