"""lora.modules_to_save: the embedding trained beside LoRA, tied head and all, saved in the adapter file and
loaded back by peft as the contract says (seconds, CPU)."""

import pytest
import torch

from bioray.config import load
from bioray.errors import ConfigError
from bioray.model import add_lora


def _llama(tied: bool = True, vocab_size: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied))


def _train_a_step(model) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(50, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_without_it_the_embedding_stays_frozen():
    model = add_lora(_llama(), load(None))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)


def test_the_saved_embedding_and_its_tied_head_come_back_with_peft(tmp_path):
    from peft import PeftModel

    cfg = load(None, ["lora.modules_to_save=[embed_tokens]"])
    base = _llama()
    before = base.get_input_embeddings().weight.detach().clone()
    model = add_lora(_llama(), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "embed_tokens" in n]
    assert trainable, "the embedding is not trained"
    _train_a_step(model)
    model.eval()
    emb = model.get_input_embeddings()
    trained = (emb.modules_to_save["default"] if hasattr(emb, "modules_to_save") else emb).weight
    assert not torch.equal(trained, before)  # the step moved it
    head = model.get_output_embeddings()
    head_w = (head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head).weight
    assert torch.equal(head_w, trained)  # tied: the head is the trained embedding

    ids = torch.arange(10)[None]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in saved), sorted(saved)[:5]
    again = PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, want, atol=1e-6)


def test_an_untied_head_is_left_alone():
    cfg = load(None, ["lora.modules_to_save=[embed_tokens]"])
    model = add_lora(_llama(tied=False), cfg)
    head = model.get_output_embeddings()
    assert not any(p.requires_grad for p in head.parameters())


def test_a_module_the_model_lacks_is_a_config_error():
    cfg = load(None, ["lora.modules_to_save=[no_such_module]"])
    with pytest.raises(ConfigError, match="lora.modules_to_save.*no_such_module.*embed_tokens"):
        add_lora(_llama(), cfg)


def test_the_scorer_swaps_such_adapters_without_keeping_the_previous_ones_weights(tmp_path):
    """The eval pool's Generator swaps checkpoints on one base: with modules trained whole, peft's own swap
    kept the first adapter's embedding (every answer of a real run scored 0); each must answer as itself."""
    import json

    from peft import PeftModel

    from bioray.config import dump
    from bioray.evaluate.generate import Generator
    from bioray.model import _train_tokenizer

    tok = _train_tokenizer(["the patient has asthma", "no signs of cancer were found"] * 20, 300)
    cfg = load(None, ["lora.modules_to_save=[embed_tokens]"])
    base = tmp_path / "base"
    from transformers import LlamaForCausalLM

    _llama(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    ckpts = []
    for k in range(2):
        model = add_lora(LlamaForCausalLM.from_pretrained(base), cfg)
        torch.manual_seed(k + 1)
        with torch.no_grad():  # two different trained embeddings
            model.get_input_embeddings().modules_to_save["default"].weight.normal_()
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(tmp_path / f"step-{k}")
        tok.save_pretrained(tmp_path / f"step-{k}")
        (tmp_path / f"step-{k}" / "bioray.yaml").write_text(dump(cfg))
        ckpts.append(tmp_path / f"step-{k}")
    assert json.loads((ckpts[1] / "adapter_config.json").read_text())["modules_to_save"]

    ids = torch.tensor([tok("the patient has cancer")["input_ids"]])
    gen = Generator(str(base), cfg)
    for ckpt in (ckpts[0], ckpts[1], ckpts[0]):
        gen.use(ckpt)
        want = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(ckpt)).eval()
        with torch.no_grad():
            assert torch.allclose(gen.model(input_ids=ids).logits, want(input_ids=ids).logits, atol=1e-5), ckpt
