"""A server that cannot load its model says why in one line and exits non-zero."""
import subprocess
import sys


def test_missing_model_fails_with_one_line(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    for model, words in [(str(tmp_path / "missing.gguf"), "not found"), (str(bad), "gguf")]:
        proc = subprocess.run([sys.executable, "-m", "sift.server", "serve", "--model", model, "--port", "0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if "model load failed" in line]
        assert len(errors) == 1 and words in errors[0].lower(), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_unsupported_architecture_and_bad_chat_template_fail_with_one_line(tmp_path):
    """The architecture error names the model's class and lists every registered one, read at run time."""
    import json

    from sift.models.registry import supported_architectures

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    template = tmp_path / "broken.jinja"
    template.write_text("{% if messages %}never closed")
    cases = [(["--model", str(folder)], f"'GPT2LMHeadModel'; supported: {', '.join(supported_architectures())}"),
             (["--chat-template", str(template)], "broken.jinja, line 1")]
    for args, words in cases:
        proc = subprocess.run([sys.executable, "-m", "sift.server", "serve", *args, "--port", "0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if "model load failed" in line]
        assert len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
