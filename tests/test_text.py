import json
import logging
from dataclasses import replace

import pytest
import torch

from conftest import TINY_ARCH, TINY_CLIP_ARCH, randomize, tiny_config
from fusedit.config import ConfigError, TextConfig, load_config
from fusedit.data.shapes import vocabulary
from fusedit.sampling.generation import generate
from fusedit.system import build_model
from fusedit.text.context import PromptCut
from fusedit.text.tokenizer import word_tokenizer


def test_a_limit_past_the_models_positions_is_named_at_build(caplog):
    """A max_length (with the template's tokens) past an LLM's or CLIP's max_position_embeddings is named in
    one warning per encoder with the largest limit that fits; a limit that fits says nothing."""
    qwen = {"family": "qwen2", "arch": TINY_ARCH, "max_length": 200, "template": "lidit"}
    cfg = tiny_config(
        model={"design": "dit-cross", "pooled_text": "clip", "refiner_depth": 1, "refiner_heads": 4},
        extra_text=[qwen],
        pooled_text={"arch": TINY_CLIP_ARCH, "max_length": 40},
    )
    with caplog.at_level(logging.WARNING, logger="fusedit.system"):
        model = build_model(cfg)
    template = model.extra_text[0].max_length - 200
    assert template > 0
    assert [r.getMessage() for r in caplog.records] == [
        f"extra_text.0.max_length=200 and the template's {template} token(s) make {200 + template} positions, "
        "more than the model's max_position_embeddings=128: longer prompts read positions it never learned; "
        f"set extra_text.0.max_length <= {128 - template}",
        "pooled_text.max_length=40 makes 40 positions, more than the model's max_position_embeddings=32: "
        "longer prompts read positions it never learned; set pooled_text.max_length <= 32",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit.system"):
        build_model(tiny_config(text={"max_length": 128}))
    assert not caplog.records


def test_prompts_are_right_padded_and_truncated_and_the_cut_rows_returned():
    model = build_model(tiny_config(text={"max_length": 5}))
    tok = model.text.tokenizer
    prompts = ["a red circle", "a blue square to the left of a green triangle"]
    ids, mask = model.text.tokenize(prompts)
    assert ids.shape == mask.shape == (2, 5)
    assert ids[0].tolist() == [
        tok.bos_token_id,
        *tok.convert_tokens_to_ids(["a", "red", "circle"]),
        tok.pad_token_id,
    ]
    assert mask[0].tolist() == [True, True, True, True, False] and mask[1].all()
    assert model.text.encode(prompts, model.denoiser.text_requests[0]).cut == PromptCut(
        frozenset({1}), 0, ((model.text.limit_named, frozenset({1})),)
    )
    with pytest.raises(TypeError, match="list of prompts"):
        model.text.tokenize("a red circle")


def test_encoding_reads_the_batchs_lengths_on_the_host_and_gives_what_the_device_would():
    """A training step's encoding (its LLM compiled: an eager transformers LLM checks its mask on the device
    itself) need not wait for the device, the last step's AdamW, to learn the longest prompt: encode hands
    forward the lengths it made the batch with; forward uses them as given."""
    model = build_model(tiny_config(text={"max_length": 12, "trim_multiple": 1}))
    request = model.denoiser.text_requests[0]
    prompts = ["a red circle", "a blue square to the left of a green triangle", ""]
    ids, mask = model.text.tokenize(prompts)
    read, told = model.text(ids, mask, request), model.text.encode(prompts, request)
    assert (
        (told.mask.shape, told.padded) == (read.mask.shape, read.padded) == ((3, 11), True)
    )  # the longest prompt: 10 words and BOS
    assert torch.equal(told.lengths, read.lengths) and torch.equal(told.instruction, read.instruction)
    assert all(torch.equal(a, b) for kv, other in zip(told.kv, read.kv) for a, b in zip(kv, other))
    assert model.text(ids, mask, request, (2, 3)).mask.shape == (3, 3)  # trimmed to the given longest


def test_host_tensors_reach_the_device_unchanged():
    from fusedit.devices import host_to_device

    x = torch.arange(6).view(2, 3)
    assert torch.equal(host_to_device(x, "cpu"), x) and host_to_device(x, "meta").device.type == "meta"


def test_each_encoding_returns_the_rows_it_cut_and_says_nothing(caplog):
    """Training meets the same over-long captions batch after batch: the run says the first and counts the
    rest (test_train), from the rows each encoding returns; the encoders keep no count and log nothing."""
    model = build_model(tiny_config(text={"max_length": 5}))
    long = "a blue square to the left of a green triangle"
    with caplog.at_level(logging.WARNING):
        cuts = [model.encode_prompts(p).cut for p in ([long, "a red circle"], [long, long], ["a red circle"])]
    assert [cut.prompts for cut in cuts] == [{0}, {0, 1}, set()] and not caplog.records
    # Guidance's negative prompt rows come first: told apart from the prompts'.
    cut = model.encode_prompts([long, "", "a red circle", long], negatives=2).cut
    assert (cut.rows, cut.prompts, cut.negative) == ({0, 3}, {1}, True)


def test_a_prompt_cut_by_several_encoders_counts_once_and_each_limit_is_named(caplog):
    """Two LLMs (LI-DiT) and a pooled CLIP (clip-mod) each cut a long prompt to their own limit: the model
    counts the prompt once, and its limits (what the warnings say) name each encoder's setting; a prompt
    cut by one encoder only names that one's limit, the one to raise."""
    qwen = {"family": "qwen2", "arch": TINY_ARCH, "max_length": 8}
    cfg = tiny_config(
        model={"design": "dit-cross", "pooled_text": "clip", "refiner_depth": 1, "refiner_heads": 4},
        text={"max_length": 5},
        extra_text=[qwen],
        pooled_text={"arch": TINY_CLIP_ARCH, "max_length": 7},
    )
    model = build_model(cfg)
    assert model.limits == "one of text.max_length=5, extra_text.0.max_length=8, pooled_text.max_length=7"
    long = "a blue square to the left of a green triangle"  # 10 words: every encoder cuts it
    middle = "a blue square to the left"  # 6 words: only the first LLM (5 with <bos>) cuts it
    prompts = [long, middle, "a red circle"]
    context = model.encode_prompts(prompts)
    assert [text.cut.rows for text in context.all] == [{0, 1}, {0}]
    assert model.pooled_text.cut_rows(prompts) == {0}
    assert context.cut.prompts == {0, 1}
    every = ["text.max_length=5", "extra_text.0.max_length=8", "pooled_text.max_length=7"]
    assert context.cut.by_limit == tuple(zip(every, [{0, 1}, {0}, {0}], strict=True))
    assert model.encode_prompts(["a red circle"]).cut.prompts == set()
    assert model.limits_of(every) == model.limits and model.limits_of(every[1:]) == "one of " + ", ".join(
        every[1:]
    )
    # Sampling counts each prompt once, with the text cache or without it (which encodes at every step).
    for cache_text in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _, cut = generate(
                model,
                [long],
                image_size=16,
                steps=3,
                guidance=2.0,
                cache_text=cache_text,
                return_cut=True,
            )
        assert cut == PromptCut.of([(name, {1}) for name in every], 1)
        assert cut.prompts == {0} and not cut.negative
        assert [r.getMessage() for r in caplog.records] == [
            f"the prompt is longer than {model.limits} tokens: its end was cut"
        ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        generate(model, [middle, "a red circle"], image_size=16, steps=1, guidance=2.0)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of the 2 prompts was longer than text.max_length=5 tokens: its end was cut"
    ]


def test_instruction_prefix_and_chat_template():
    model = build_model(tiny_config(text={"instruction": "a green square "}))
    tok = model.text.tokenizer
    ids, mask = model.text.tokenize(["a red circle"])
    words = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert words == ["<bos>", "a", "green", "square", "a", "red", "circle"]

    # a chat template is rendered by the tokenizer around the prompt; its tokens are marked as instruction
    cfg = tiny_config(text={"template": "chat", "system_prompt": "above"})
    from fusedit.system import builtin_words, load_tokenizer

    tok = load_tokenizer(cfg.text, builtin_words(cfg))
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] == 'system' and 'left' or 'right' }} "
        "{{ m['content'] }} below {% endfor %}{% if add_generation_prompt %}two{% endif %}"
    )
    from fusedit.text.encoder import TextEncoder
    from fusedit.text.templates import build_template

    enc = TextEncoder(model.text.llm, tok, 16, build_template("chat", tok, "", "above"))
    ids, mask = enc.tokenize(["a red circle", "a blue square"])
    words = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert words == ["<bos>", "left", "above", "below", "right", "a", "red", "circle", "below", "two"]
    instruction = enc.instruction_mask(mask.sum(1), ids.shape[1])[0][mask[0]].tolist()
    assert instruction == [False, True, True, True, True, False, False, False, True, True]

    # A template that refuses a system turn (Gemma's) is a setting to change, said in one line.
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError) as e:
        build_template("chat", tok, "", "above")
    assert str(e.value).endswith(
        "chat template refuses the prompt with text.system_prompt='above': System role not supported "
        "(allowed: an empty text.system_prompt, or text.template plain or lidit, which need no chat template)"
    )
    assert build_template("chat", tok, "", "").prefix == ""


def test_a_chat_template_that_prints_todays_date_renders_one_fixed_date():
    """Llama-3.2/3.3-Instruct's templates write today's date into the system turn: rendered at every build,
    a run's conditioning (and its images) changed from one day to the next."""
    from fusedit.system import builtin_words, load_tokenizer
    from fusedit.text.templates import CHAT_DATE, build_template

    cfg = tiny_config(text={"template": "chat"})
    tok = load_tokenizer(cfg.text, builtin_words(cfg))
    tok.chat_template = (  # Llama-3.2's logic: the clock unless the caller gives date_string
        "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "Today Date: {{ date_string }} {% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    first, second = (build_template("chat", tok, "a", "").prefix for _ in range(2))
    assert first == second == f"Today Date: {CHAT_DATE} a"


def test_lidit_template_marks_its_instruction_and_truncates_only_the_prompt():
    from fusedit.text.templates import LIDIT_INSTRUCTION

    n_instr = len(LIDIT_INSTRUCTION.replace(":", " :").replace(",", " ,").split())
    # text.max_length counts the prompt and BOS; the template's tokens come on top
    model = build_model(tiny_config(text={"template": "lidit", "max_length": 5}))
    tok = model.text.tokenizer
    context = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
    assert context.cut.prompts == {1}
    ids, mask = model.text.tokenize(["a red circle"])
    words = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert words[:3] == ["<bos>", "Describe", "the"] and words[-3:] == ["a", "red", "circle"]
    assert "<unk>" not in words  # the built-in vocabulary includes the template's words
    # instruction tokens: everything of the template except <bos>; the prompt's tokens are not
    assert context.instruction[0].tolist() == [False] + [True] * n_instr + [False] * 4
    assert context.instruction[1].sum() == n_instr and context.mask[1].all()  # prompt cut, template kept
    assert context.mask[1].sum() == 1 + n_instr + 4 == model.text.max_length


@pytest.mark.parametrize("text", [{}, {"instruction": "a green square "}, {"template": "lidit"}])
def test_empty_prompt_is_just_bos_without_the_template(text):
    """A dropped caption and the empty negative prompt are "" as in the public code: no instruction."""
    model = build_model(tiny_config(text=text))
    ids, mask = model.text.tokenize(["", "a red circle"])
    assert mask[0].sum() == 1 and ids[0, 0] == model.text.tokenizer.bos_token_id
    assert mask[1].sum() == 4 + len(model.text.prefix_ids) - 1  # the prompt row keeps its template
    instruction = model.text.instruction_mask(mask.sum(1), ids.shape[1])
    assert not instruction[0].any() and instruction[1].sum() == len(model.text.prefix_ids) - 1


def test_a_prefix_ending_in_a_space_tokenises_as_one_string_with_the_prompt():
    """SentencePiece- and GPT-style tokenizers fold a space into the next word ("▁a"): "Imagine: " alone
    would end in a lone space token and "a" would lose its space. Prefix and prompt tokenise as one text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from fusedit.text.encoder import TextEncoder
    from fusedit.text.templates import build_template

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "Imagine:", "▁", "a", "▁a", "red", "▁red"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    model = build_model(tiny_config())
    enc = TextEncoder(model.text.llm, tok, 8, build_template("plain", tok, "Imagine: "))
    ids, mask = enc.tokenize(["a red", ""])
    whole = tok("Imagine: a red")["input_ids"]
    assert tok.convert_ids_to_tokens(whole) == ["<bos>", "Imagine:", "▁a", "▁red"]
    assert ids[0][mask[0]].tolist() == whole
    assert ids[1][mask[1]].tolist() == [tok.bos_token_id]


def test_an_unknown_word_of_the_instruction_is_instruction_not_a_special_token():
    """The built-in word tokenizer turns an instruction word it lacks into <unk>: that token is part of the
    instruction (dropped after the refiners, on top of text.max_length), not a special token like <bos>."""
    from fusedit.text.encoder import TextEncoder
    from fusedit.text.templates import build_template
    from fusedit.text.tokenizer import word_tokenizer

    tok = word_tokenizer(["draw", "a", "red", "circle"])
    model = build_model(tiny_config())
    enc = TextEncoder(model.text.llm, tok, 4, build_template("plain", tok, "draw zebras "))
    assert tok.convert_ids_to_tokens(enc.prefix_ids) == ["<bos>", "draw", "<unk>"]
    assert enc.prefix_instruction.tolist() == [False, True, True]
    assert enc.budget == 3 and enc.max_length == 6  # <bos> counts in text.max_length, the template on top
    ids, mask = enc.tokenize(["a red circle"])
    assert mask.sum().item() == 6
    assert enc.instruction_mask(mask.sum(1), ids.shape[1])[0].tolist() == [
        False,
        True,
        True,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("bos", [True, False])
def test_chat_markers_registered_as_special_are_instruction_before_the_prompt_as_after_it(bos):
    """Gemma-it and Qwen2-Instruct register their turn markers as special tokens; the DiT keeps only what
    the tokenizer puts before any text (Gemma's <bos>, nothing for Qwen), not the markers around the prompt."""
    from fusedit.system import builtin_words, load_tokenizer
    from fusedit.text.encoder import TextEncoder
    from fusedit.text.templates import build_template

    cfg = tiny_config()
    model = build_model(cfg)
    tok = load_tokenizer(cfg.text, builtin_words(cfg) + ["user", "model"])
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = (
        "{{ bos_token }}" * bos + "{% for m in messages %}<start_of_turn> {{ m['role'] }} {{ m['content'] }} "
        "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn> model {% endif %}"
    )
    if not bos:  # Qwen's tokenizer adds no BOS
        tok._tokenizer.post_processor = None
    enc = TextEncoder(model.text.llm, tok, 8, build_template("chat", tok))
    ids, mask = enc.tokenize(["a red circle"])
    words = tok.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    kept = ["<bos>"] * bos + ["a", "red", "circle"]
    assert words == kept[:bos] + ["<start_of_turn>", "user"] + kept[bos:] + [
        "<end_of_turn>",
        "<start_of_turn>",
        "model",
    ]
    instruction = enc.instruction_mask(mask.sum(1), ids.shape[1])[0][mask[0]].tolist()
    assert [w for w, drop in zip(words, instruction, strict=True) if not drop] == kept
    assert enc.budget == 8 - bos  # only <bos> counts in text.max_length
    # The context counts <bos> as the tokens every row opens with (LI-DiT's channel concatenation aligns
    # the LLMs past them), an empty prompt's row included.
    from fusedit.text.context import TextRequest

    ids, mask = enc.tokenize(["a red circle", ""])
    assert enc(ids, mask, TextRequest(hidden_layer=1)).leading == bos
    assert ids[:, :bos].eq(tok.bos_token_id).all()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_llm_and_tokenizer_load_from_a_local_folder(tmp_path, family):
    """text.model_id may be a folder written by save_pretrained (the same code path as a hub id), and its
    tokenizer the folder's own or another (text.tokenizer). transformers loads the tokenizer of a qwen2
    folder as its Qwen2Tokenizer whatever class was saved, which reads the test's word list wrongly: the
    words go in a folder of their own there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / family
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY_ARCH))
    hf.save_pretrained(folder)
    words = folder if family == "llama" else tmp_path / "words"
    word_tokenizer(vocabulary()).save_pretrained(words)
    text = {"model_id": str(folder), "family": family, "tokenizer": "" if words == folder else str(words)}
    model = build_model(tiny_config(text=text, model={"num_layers": 2}))
    tokens = model.text.tokenizer.convert_ids_to_tokens(model.text.tokenizer("a red circle")["input_ids"])
    assert tokens[-3:] == ["a", "red", "circle"]
    assert len(model.text.llm.layers) == 2  # truncated after the deepest fused layer
    assert all(not p.requires_grad for p in model.text.llm.parameters())
    ref = hf.model.layers[1].self_attn.k_proj.weight
    assert torch.equal(model.text.llm.layers[1].self_attn.k_proj.weight, ref)
    v = model(torch.randn(2, 3, 16, 16), torch.rand(2), model.encode_prompts(["a red circle", ""]))
    assert v.shape == (2, 3, 16, 16)


def test_missing_model_folder_is_a_one_line_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for device in ("cpu", "meta"):  # meta: fusedit describe, whose preset arch stands in for hub ids only
        with pytest.raises(ConfigError, match="text.model_id=.*no-such-model' is a path to nothing") as e:
            build_model(tiny_config(text={"model_id": str(tmp_path / "no-such-model")}), device)
        assert "\n" not in str(e.value)


def test_a_model_id_that_is_no_transformers_model_is_refused_naming_its_key(tmp_path):
    from conftest import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")  # a diffusers folder: its config.json has no model_type
    (tmp_path / "pipe" / "text_encoder").mkdir(parents=True)
    index = {
        "_class_name": "FuseDiTPipeline",
        "text_encoder": ["transformers", "Qwen3Model"],
        "vae": ["diffusers", "x"],
    }
    index |= {"text_encoder_2": ["transformers", "LlamaModel"], "text_encoder_3": [None, None]}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    vae, pipe = str(tmp_path / "vae"), str(tmp_path / "pipe")
    with pytest.raises(
        ConfigError, match=rf"^text.model_id='{vae}' cannot be read as a transformers model \(allowed: an LLM"
    ):
        build_model(tiny_config(text={"model_id": vae}), "meta")
    extra = {"design": "dit-cross", "refiner_depth": 1, "pos_embed": "none", "conv_pos": True}
    cfg = tiny_config(model=extra, extra_text=[{"model_id": pipe}])
    with pytest.raises(
        ConfigError,
        match=r"^extra_text\.0\.model_id=.* it is a pipeline folder: its LLMs are in .*text_encoder'",
    ) as e:
        build_model(cfg, "meta")
    assert f"its LLMs are in '{pipe}/text_encoder', '{pipe}/text_encoder_2', and to train on" in str(e.value)


def test_pretraining_a_random_llm_lowers_its_caption_loss_and_restores_freezing():
    from fusedit.data.shapes import caption_corpus
    from fusedit.train.pretrain_llm import pretrain_llm

    model = build_model(tiny_config())
    losses = pretrain_llm(model.text, caption_corpus(256, seed=0), steps=30, batch_size=16, progress=False)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(not p.requires_grad for p in model.text.llm.parameters()) and not model.text.llm.training


def test_language_decoder_of_a_multimodal_checkpoint(tmp_path):
    """PaliGemma-style folders: the fused LLM is the multimodal model's language decoder, with its weights."""
    from transformers import AutoModel, PaliGemmaConfig

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    text = dict(model_type="gemma", **{**TINY_ARCH, "num_key_value_heads": 1})
    mm = AutoModel.from_config(PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=32))
    mm.save_pretrained(tmp_path / "pg")
    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "pg")
    model = build_model(tiny_config(text={"model_id": str(tmp_path / "pg")}, model={"num_layers": 2}))
    assert len(model.text.llm.layers) == 2
    ref = mm.language_model.layers[1].mlp.up_proj.weight
    assert torch.equal(model.text.llm.layers[1].mlp.up_proj.weight, ref)


def _local_llm(folder, tokenizer, family="qwen2"):
    """A random LLM saved in ``folder``; ``tokenizer`` saved beside it in a folder of its own, which
    text.tokenizer names (None for none at all)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY_ARCH)).save_pretrained(folder)
    text = {"model_id": str(folder), "family": family}
    if tokenizer is not None:
        tokenizer.save_pretrained(folder.with_name(folder.name + "-tokenizer"))
        text["tokenizer"] = str(folder.with_name(folder.name + "-tokenizer"))
    return tiny_config(text=text)


def test_a_qwen2_folders_own_tokenizer_json_is_what_splits_its_text(tmp_path, caplog):
    """transformers 5 rebuilds a Qwen2 folder's tokenizer.json as Qwen's byte-level BPE: a word-level one
    there made most words one id. The folder's own file is what splits the text, as it does in a Llama
    folder."""
    from transformers import AutoConfig, AutoTokenizer

    from fusedit.text.llm import load_tokenizer

    words = word_tokenizer(vocabulary())
    prompt = "a red circle to the left of a blue square"
    for family in ("qwen2", "llama"):
        folder = tmp_path / family
        AutoConfig.for_model(family, **TINY_ARCH).save_pretrained(folder)
        words.save_pretrained(folder)
        with caplog.at_level(logging.INFO, logger="fusedit.text.llm"):
            tok = load_tokenizer(TextConfig(model_id=str(folder), family=family))
        assert tok(prompt)["input_ids"] == words(prompt)["input_ids"]
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
            words.bos_token,
            words.eos_token,
            words.pad_token,
        )
    raw = AutoTokenizer.from_pretrained(tmp_path / "qwen2")(prompt, add_special_tokens=False)["input_ids"]
    assert len(set(raw)) < len(set(words(prompt, add_special_tokens=False)["input_ids"]))  # what it was
    assert caplog.text.count("splits text otherwise than the folder's tokenizer.json") == 1


def test_a_tokenizer_given_apart_whose_special_ids_differ_from_the_llms_is_warned_about(tmp_path, caplog):
    """Another LLM's tokenizer whose ids fit the embeddings builds and trains: where its BOS/EOS ids are
    not those the LLM's config names, the build says so, naming both settings."""
    words = word_tokenizer(vocabulary())
    ids = {"bos_token_id": words.bos_token_id, "eos_token_id": words.eos_token_id}
    cfg = _local_llm(tmp_path / "llama", words, family="llama")
    config_file = tmp_path / "llama" / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, **ids}))
    with caplog.at_level(logging.WARNING):
        build_model(cfg, with_autoencoder=False)
    assert "is it this LLM's tokenizer?" not in caplog.text
    config_file.write_text(json.dumps({**saved, **ids, "bos_token_id": 40}))
    with caplog.at_level(logging.WARNING):
        build_model(cfg, with_autoencoder=False)
    assert caplog.messages == [
        f"text.tokenizer={cfg.text.tokenizer!r} gives the BOS token id {words.bos_token_id} but "
        f"text.model_id={cfg.text.model_id!r}'s config says 40: is it this LLM's tokenizer? (none: the model_id's own)"
    ]
    # A tokenizer in another LLM's folder: its config names another model type.
    from transformers import AutoConfig

    qwen = tmp_path / "qwen2"
    AutoConfig.for_model("qwen2", **TINY_ARCH).save_pretrained(qwen)
    words.save_pretrained(qwen)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_model(replace(cfg, text=replace(cfg.text, tokenizer=str(qwen))), with_autoencoder=False)
    assert [m for m in caplog.messages if "this LLM's tokenizer" in m] == [
        f"text.tokenizer={str(qwen)!r} is the tokenizer of a qwen2 model but text.model_id={cfg.text.model_id!r} "
        "is a llama LLM: is it this LLM's tokenizer? (none: the model_id's own)"
    ]


def _byte_level_bpe(digits: str):
    """A small byte-level BPE with Qwen2's pre-tokenizer (``digits`` "" : one id per digit) or Llama-3's
    ("{1,3}": up to three digits a piece), trained here on a few captions."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + digits
        + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    corpus = ["a photo of 3 red cats in 2024, it's 12:30!", "the Eiffel Tower at night\n\nnaïve café"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet),
    )
    return tok


def test_a_qwen2_tokenizer_json_of_qwens_kind_keeps_its_class_and_another_bpe_is_read_as_its_file(
    tmp_path, caplog
):
    """A tokenizer.json of Qwen2's own kind reads alike through transformers' Qwen2Tokenizer: kept, no
    warning. A Llama-3-style BPE in a Qwen2 folder is a BPE too, but Qwen2's class splits numbers one digit
    an id, which the probe's "2024" tells."""
    import json as json_

    from transformers import AutoConfig

    from fusedit.text.llm import load_tokenizer

    for kind, digits in (("qwen", ""), ("llama3", "{1,3}")):
        folder = tmp_path / kind
        AutoConfig.for_model("qwen2", **TINY_ARCH).save_pretrained(folder)
        _byte_level_bpe(digits).save(str(folder / "tokenizer.json"))
        settings = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "bos_token": None}
        (folder / "tokenizer_config.json").write_text(json_.dumps(settings))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            tok = load_tokenizer(TextConfig(model_id=str(folder), family="qwen2"))
        own = _byte_level_bpe(digits).encode("in 2024", add_special_tokens=False).ids
        assert tok("in 2024", add_special_tokens=False)["input_ids"] == own
        switched = "splits text otherwise than the folder's tokenizer.json" in caplog.text
        assert (type(tok).__name__ == "Qwen2Tokenizer", switched) == (
            (True, False) if kind == "qwen" else (False, True)
        )


def test_an_empty_prompt_without_bos_is_the_end_of_text_token(tmp_path):
    """Qwen's tokenizers add no BOS: an empty prompt (a dropped caption, the negative prompt) would be zero
    tokens, which the LLM cannot run on. It becomes one end-of-text token, in training and in sampling."""
    from tokenizers import processors

    from fusedit.sampling.generation import generate

    tok = word_tokenizer(vocabulary())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    model = build_model(_local_llm(tmp_path / "qwen", tok))
    ids, mask = model.text.tokenize(["", "a red circle"])
    assert mask.sum(1).tolist() == [1, 3] and ids[0, 0] == model.text.tokenizer.eos_token_id
    images = generate(model, [""], image_size=16, steps=2, guidance=3.0)  # empty prompt and negative
    assert torch.isfinite(images).all()


def test_a_tokenizer_that_does_not_fit_the_llm_is_a_one_line_config_error(tmp_path):
    # a folder with the LLM's weights but no tokenizer files: transformers builds an empty tokenizer
    with pytest.raises(ConfigError, match="into no tokens .*no tokenizer files"):
        build_model(_local_llm(tmp_path / "no-tokenizer", None))
    # a tokenizer whose ids run past the LLM's 64 embeddings: refused at build (see below); an encoder put
    # together by hand (a pipeline's components) is refused at the first prompt past them
    big = word_tokenizer([f"w{i}" for i in range(100)] + vocabulary())
    with pytest.raises(ConfigError, match="gives text token ids up to 128 but its LLM has 64 embeddings"):
        build_model(_local_llm(tmp_path / "big", big))
    from fusedit.text.encoder import TextEncoder

    by_hand = TextEncoder(build_model(tiny_config()).text.llm, big, 16)
    with pytest.raises(ConfigError, match="token ids up to 1.. .*64 embeddings: it is not this LLM's"):
        by_hand.tokenize(["a red circle"])


def test_loading_reports_missing_llm_weights_but_not_the_unread_lm_head(tmp_path, caplog, capfd):
    """The base model never reads a causal LM's head: no table about it. A weight the LLM needs but the
    checkpoint lacks stays random, which is worth one warning."""
    from safetensors.torch import load_file, save_file

    cfg = _local_llm(tmp_path / "llama", word_tokenizer(vocabulary()), family="llama")
    build_model(cfg)
    assert "LOAD REPORT" not in capfd.readouterr().err and "lacks" not in caplog.text
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        build_model(cfg)
    assert (
        "lacks 1 weight(s) the LLM needs (random instead), e.g. layers.0.self_attn.k_proj.weight"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("family", "keys", "expected"),
    [
        ("llama", {"hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"}, "silu"),
        ("gemma2", {"hidden_activation": "gelu"}, "gelu"),
        ("qwen2", {"hidden_act": "relu"}, "relu"),
    ],
)
def test_the_dit_mirrors_the_activation_the_llms_mlp_runs(family, keys, expected):
    """A Llama config carrying a hidden_activation key (from another family's arch) still runs hidden_act;
    Gemma-2 declares hidden_activation and runs it."""
    from transformers import AutoConfig, AutoModel
    from transformers.activations import ACT2FN

    from fusedit.text.spec import LLMSpec

    arch = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    arch |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    config = AutoConfig.for_model(family, **arch, **keys)
    assert LLMSpec.from_hf(config).activation == expected
    mlp_act = AutoModel.from_config(config).layers[0].mlp.act_fn
    assert type(mlp_act) is type(ACT2FN[expected])


def test_the_llms_attention_kernel_is_a_config_value():
    """text.attn_implementation: auto is transformers' pick per family (sdpa for Gemma, eager for Gemma-2,
    whose logit soft-capping sdpa cannot do); a named kernel computes the same context; a kernel the family
    cannot run is refused in one line when the LLM loads."""

    def context(cfg):
        torch.manual_seed(0)
        model = build_model(cfg, with_autoencoder=False)
        return model.text.llm.config._attn_implementation, model.encode_prompts(["a red circle", "two blue"])

    auto, sdpa = context(tiny_config()), context(tiny_config(text={"attn_implementation": "sdpa"}))
    eager = context(tiny_config(text={"attn_implementation": "eager"}))
    assert (auto[0], sdpa[0], eager[0]) == ("sdpa", "sdpa", "eager") and sdpa[1].kv
    for (k, v), (k_eager, v_eager) in zip(sdpa[1].kv, eager[1].kv, strict=True):
        torch.testing.assert_close(k_eager, k)
        torch.testing.assert_close(v_eager, v)
    assert context(tiny_config(text={"family": "gemma2"}))[0] == "eager"
    with pytest.raises(
        ConfigError, match=r"^text.attn_implementation='sdpa' cannot run the gemma2 LLM: [^\n]*$"
    ):
        build_model(tiny_config(text={"family": "gemma2", "attn_implementation": "sdpa"}))
    # A further LLM's kernel is named by its own section, the setting to change.
    extra = {"family": "gemma2", "arch": TINY_ARCH, "attn_implementation": "sdpa"}
    lidit = {"design": "dit-cross", "refiner_depth": 1, "refiner_heads": 4}
    with pytest.raises(
        ConfigError, match=r"^extra_text.0.attn_implementation='sdpa' cannot run the gemma2 LLM"
    ):
        build_model(tiny_config(model=lidit, extra_text=[extra]))


def test_deep_fusion_refuses_an_llm_whose_attention_makes_its_keys_otherwise(tmp_path):
    """Cohere loads like a LLaMA-style LLM (q/k/v/o projections, input_layernorm) but rotates its keys
    pairwise, not by halves: deep fusion would read other keys than its attention uses. The build compares
    them with the LLM's own cache and refuses it in one line; the shallow designs, which read only
    transformers' hidden states, still take it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("cohere", **TINY_ARCH, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "cohere")
    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "cohere")
    text = {"model_id": str(tmp_path / "cohere")}
    with pytest.raises(ConfigError) as e:
        build_model(tiny_config(text=text, model={"num_layers": 2}), with_autoencoder=False)
    assert str(e.value).startswith(
        "an LLM of model_type 'cohere' is not supported by deep fusion: layer 0's keys/values differ from "
        "those its attention uses (the shallow designs dit-self/dit-cross read only its hidden states; allowed:"
    )
    assert "\n" not in str(e.value)
    shallow = build_model(tiny_config(text=text, model={"design": "dit-cross"}), with_autoencoder=False)
    assert shallow.encode_prompts(["a red circle"]).hidden.shape == (1, 4, 32)
    # LLaMA-style families pass.
    build_model(tiny_config(model={"num_layers": 2}), with_autoencoder=False).encode_prompts(["a red circle"])


def _word_level_tokenizer(folder, vocab: dict[str, int], **specials):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_with_only_an_unknown_token_pads_with_it_and_padding_changes_no_prompt(tmp_path):
    """Padding is masked, so a tokenizer naming neither a pad nor an end-of-text token pads with its
    unknown token: a prompt's velocity is the same alone and beside a longer prompt."""
    from fusedit.text.llm import load_tokenizer

    words = ["a", "red", "circle", "blue", "square", "left", "of"]
    folder = _word_level_tokenizer(
        tmp_path / "unk", {"<unk>": 0, **{w: k + 1 for k, w in enumerate(words)}}, unk_token="<unk>"
    )
    tok = load_tokenizer(TextConfig(tokenizer=folder))
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token) == ("<unk>", 0, None)
    model = build_model(tiny_config(text={"tokenizer": folder}), with_autoencoder=False)
    randomize(model.denoiser)
    alone = model.encode_prompts(["a red circle"])
    batch = model.encode_prompts(["a red circle", "a blue square left of a red circle"])
    assert batch.mask.tolist()[0] == [True] * 3 + [False] * 5
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    together = model(torch.cat([x, x]), torch.cat([t, t]), batch)[:1]
    torch.testing.assert_close(model(x, t, alone), together, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_with_nothing_to_pad_with_says_what_is_allowed(tmp_path):
    from fusedit.text.llm import load_tokenizer

    folder = _word_level_tokenizer(tmp_path / "bare", {"a": 0, "photo": 1, "of": 2, "cat": 3})
    with pytest.raises(ConfigError) as e:
        load_tokenizer(TextConfig(tokenizer=folder))
    assert str(e.value) == (
        f"tokenizer {folder!r} has neither a pad, an end-of-text nor an unknown token to pad prompts with "
        "(allowed: a tokenizer naming one, e.g. pad_token, eos_token or unk_token in its tokenizer_config.json)"
    )


def test_a_tokenizer_with_more_ids_than_the_llm_has_embeddings_is_refused_at_build(tmp_path):
    """Accepted before, it failed at the first caption using a high id: step 3 of a run, hours into a real
    one. Refused when the model is built (describe too, as it loads a local tokenizer), naming the section."""
    words = vocabulary()
    word_tokenizer([*words, *(f"w{i}" for i in range(80 - len(words)))]).save_pretrained(tmp_path / "tok")
    cfg = tiny_config(text={"tokenizer": str(tmp_path / "tok")})
    for device in ("cpu", "meta"):
        with pytest.raises(ConfigError) as e:
            build_model(cfg, device, with_autoencoder=False)
        rows = build_model(tiny_config(), "meta", with_autoencoder=False).text.llm.get_input_embeddings()
        assert str(e.value) == (
            f"text's tokenizer ({tmp_path / 'tok'}) gives text token ids up to 83 but its LLM has "
            f"{rows.num_embeddings} embeddings, so a prompt using an id past {rows.num_embeddings - 1} would fail "
            "(allowed: the LLM's own tokenizer as text.tokenizer, or none to use text.model_id's)"
        )
    # A special token past the embeddings that no prompt produces (Gemma-3's <image_soft_token> on its
    # text-only sizes) is the LLM's own tokenizer all the same: built.
    own = word_tokenizer(vocabulary())
    own.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    own.save_pretrained(tmp_path / "own")
    # The LLM has exactly the rows of the text ids: the special token's id is one past them.
    cfg = tiny_config(text={"tokenizer": str(tmp_path / "own"), "arch": {"vocab_size": len(own) - 1}})
    model = build_model(cfg, with_autoencoder=False)
    assert (
        own.convert_tokens_to_ids("<image_soft_token>")
        == model.text.llm.get_input_embeddings().num_embeddings
    )
    assert model.encode_prompts(["a red circle"]).kv


def test_the_kv_probe_reads_the_llms_cache_without_a_deprecation_warning(monkeypatch):
    """transformers 5.24 renamed the outputs' past_key_values to cache and warns (once, in every user's log)
    on the old name: the deep designs' K/V probe, run at every build, reads the name the version has."""
    from transformers.utils import generic

    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: said.append(message))
    model = build_model(tiny_config(model={"num_layers": 2}), with_autoencoder=False)
    assert model.encode_prompts(["a red circle"]).kv and said == []


@pytest.mark.parametrize("instruction", ["", "a green square "])
def test_a_tokenizer_that_appends_eos_puts_no_eos_before_the_prompt(instruction):
    """Only what a tokenizer puts before any text (BOS) opens the sequence; one whose post-processor also
    appends <eos> must not place it between the template and the prompt, nor in an empty prompt's row."""
    from tokenizers import processors

    from fusedit.text.encoder import TextEncoder
    from fusedit.text.templates import build_template

    tok = word_tokenizer(vocabulary())
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    model = build_model(tiny_config(), with_autoencoder=False)
    enc = TextEncoder(model.text.llm, tok, 8, build_template("plain", tok, instruction))
    ids, mask = enc.tokenize(["a red circle", ""])
    words = [tok.convert_ids_to_tokens(ids[i][mask[i]].tolist()) for i in range(2)]
    assert words == [["<bos>", *instruction.split(), "a", "red", "circle"], ["<bos>"]]
    assert enc.budget == 7  # only <bos> counts in text.max_length


def test_errors_about_a_second_llm_name_its_section():
    """They named text.hidden_layer / text.template and showed the built-in tokenizer as ''."""
    out_of_range = r"^extra_text\.0\.hidden_layer=9 is out of range for an LLM with"
    with pytest.raises(ConfigError, match=out_of_range):  # at load, where the LLM's depth is known
        load_config("debug-lidit", ["extra_text.0.hidden_layer=9"])
    cfg = load_config("debug-lidit")
    cfg.extra_text[0].hidden_layer = 9  # at the build, where only it knows the depth (a hub LLM)
    with pytest.raises(ConfigError, match=out_of_range):
        build_model(cfg, with_autoencoder=False)
    cfg = load_config("debug-lidit", ["extra_text.0.template=lidit-chat"])
    with pytest.raises(ValueError) as e:
        build_model(cfg, with_autoencoder=False)
    assert str(e.value) == (
        "extra_text.0.template needs a chat template but tokenizer (the built-in word tokenizer) has none "
        "(allowed without one: plain, lidit)"
    )
