"""A Hugging Face folder taken as it is downloaded: sharded safetensors with their index, a Mistral-style
``consolidated.safetensors`` duplicate beside the HF weights, ``pytorch_model*.bin`` (single and sharded).
Each fixture folder is a tiny random Llama saved by transformers; each loads and its logits equal
transformers' in float32, or it fails with the stated error. Weights stream: host memory holds at most
one shard of checkpoint data at a time, measured on the tensors the readers hand out."""
from __future__ import annotations

import json
import os
import weakref

import pytest
import torch

from sift.models.loader import load_model
from sift.models.registry import ModelLoadError

CONFIG = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
TEXT = "Sharded checkpoints, consolidated duplicates and pickled shards all load the same weights."


def byte_tokenizer():
    """A byte-level tokenizer of 257 tokens (no merges): enough to drive a 260-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def reference():
    """The tiny random Llama (float32) and the logits it gives for TEXT."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).float().eval()
    with torch.no_grad():  # random norms too, so a misplaced tensor cannot hide
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0.0, 0.05)
    tok = byte_tokenizer()
    ids = tok.encode(TEXT)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return model, tok, ids, logits


def save(reference, path, **kwargs):
    model, tok = reference[:2]
    model.save_pretrained(path, **kwargs)
    tok.save_pretrained(path)
    return path


def save_bin(reference, path, num_shards: int):
    """``pytorch_model.bin``, or ``pytorch_model-0000i-of-0000n.bin`` shards with their index, as transformers
    < 5 wrote them with ``safe_serialization=False`` (transformers 5 only writes safetensors)."""
    model, tok = reference[:2]
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(path)
    tok.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if num_shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(num_shards):
        file = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        part = names[i * len(names) // num_shards:(i + 1) * len(names) // num_shards]
        torch.save({n: state[n] for n in part}, path / file)
        weight_map.update((n, file) for n in part)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def check_logits(path, reference, one_sequence):
    ids, ref = reference[2], reference[3]
    loaded = load_model(str(path), torch.float32, "cpu")
    assert loaded.tokenizer.encode(TEXT) == ids
    seq = one_sequence(loaded.model, len(ids))
    mine = seq.step(ids, all_logits=True)
    assert (mine - ref).abs().max() < 1e-4


def _mistral_names(state_dict: dict) -> dict:
    """The same tensors under mistral-inference's names, as ``consolidated.safetensors`` holds them."""
    rename = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj":
              "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
              "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
              "model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output", "model.": ""}
    out = {}
    for name, t in state_dict.items():
        for old, new in rename.items():
            name = name.replace(old, new)
        out[name] = t.contiguous()
    return out


def test_sharded_safetensors_through_the_index(tmp_path, reference, one_sequence):
    save(reference, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, so never opened")
    check_logits(tmp_path, reference, one_sequence)


def test_consolidated_duplicate_is_ignored_beside_hf_weights(tmp_path, reference, one_sequence):
    from safetensors.torch import save_file

    save(reference, tmp_path)
    save_file(_mistral_names(reference[0].state_dict()), str(tmp_path / "consolidated.safetensors"))
    check_logits(tmp_path, reference, one_sequence)


def test_consolidated_alone_is_refused(tmp_path, reference):
    from safetensors.torch import save_file

    save(reference, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    save_file(_mistral_names(reference[0].state_dict()), str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(ModelLoadError, match=r"only consolidated.safetensors \(Mistral's own format\)"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("num_shards", [1, 4], ids=["single", "sharded"])
def test_pytorch_bin(tmp_path, reference, one_sequence, num_shards):
    save_bin(reference, tmp_path, num_shards)
    check_logits(tmp_path, reference, one_sequence)


def test_pytorch_bin_refuses_pickled_code(tmp_path, reference):
    """weights_only=True: a .bin whose pickle would run code is refused, not executed."""
    save_bin(reference, tmp_path, 1)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "hook": os.system}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="cannot read pytorch_model.bin"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_index_naming_a_missing_shard(tmp_path, reference):
    save(reference, tmp_path, max_shard_size="100KB")
    os.remove(sorted(tmp_path.glob("model-*.safetensors"))[-1])
    with pytest.raises(ModelLoadError, match="missing shard"):
        load_model(str(tmp_path), torch.float32, "cpu")


class HostTensors:
    """Every host tensor the checkpoint readers hand out, followed by weak reference: the bytes alive at
    once (peak) and the bytes read in all. Wraps ``safe_open(...).get_tensor`` and ``torch.load``."""

    def __init__(self, monkeypatch):
        import safetensors

        self.alive = self.peak = self.total = 0
        real_open, real_load = safetensors.safe_open, torch.load
        tracker = self

        class Handle:
            def __init__(self, *args, **kwargs):
                self.inner = real_open(*args, **kwargs)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                return tracker.track(self.inner.get_tensor(name))

        def load(*args, **kwargs):
            state = real_load(*args, **kwargs)
            for t in state.values():
                tracker.track(t)
            return state

        monkeypatch.setattr(safetensors, "safe_open", Handle)
        monkeypatch.setattr(torch, "load", load)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.alive += n
        self.total += n
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._freed, n)
        return t

    def _freed(self, n: int) -> None:
        self.alive -= n


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_weights_stream_one_shard_at_a_time(tmp_path, reference, monkeypatch, serialization):
    """Loaded as bfloat16, every float32 tensor read from disk is a host temporary: the most alive at once
    is bounded by the largest shard (one tensor for safetensors), far below the whole checkpoint."""
    if serialization == "safetensors":
        save(reference, tmp_path, max_shard_size="100KB")
    else:
        save_bin(reference, tmp_path, 4)
    checkpoint_bytes = sum(p.numel() * 4 for p in reference[0].parameters())
    shards = [f for f in tmp_path.iterdir() if f.suffix in (".safetensors", ".bin")]
    assert len(shards) >= 3
    host = HostTensors(monkeypatch)
    loaded = load_model(str(tmp_path), torch.bfloat16, "cpu")
    assert host.total == checkpoint_bytes  # every tensor came through the tracked readers, once
    largest_shard = max(f.stat().st_size for f in shards)
    largest_tensor = max(p.numel() * 4 for p in reference[0].parameters())
    bound = largest_tensor if serialization == "safetensors" else largest_shard
    assert host.peak <= bound < checkpoint_bytes / 2, (host.peak, bound, checkpoint_bytes)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("present, chosen", [
    (["model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
    (["consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
     ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
    (["consolidated.safetensors", "pytorch_model.bin"], ["pytorch_model.bin"]),
    (["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "training_args.bin"],
     ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
])
def test_which_files_hold_the_weights(tmp_path, present, chosen):
    """The choice alone (empty files: nothing is read): HF safetensors first, Mistral's consolidated file
    never, .bin only without HF safetensors, and never a .bin that is not pytorch_model*."""
    from sift.models.checkpoint import find_weight_files

    for name in present:
        (tmp_path / name).touch()
    assert [os.path.basename(f) for f in find_weight_files(str(tmp_path)).files] == chosen
