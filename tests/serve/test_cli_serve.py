"""`jumpflow serve` refuses what cannot work with a one-line message and exit code 2, before serving anything."""

import socket

import pytest

from jumpflow.cli import main

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


def test_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["serve", "--ckpt", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_a_port_in_use_is_a_clear_error(vector_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--ckpt", str(vector_run), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-n", "0"], "max_n"),
    (["--max-n", "100", "--max-batch", "10"], "max_n <= max_batch"),
    (["--max-queue", "0"], "max_queue"),
    (["--port", "70000"], "cannot listen"),
])
def test_settings_that_cannot_work_are_refused(vector_run, capsys, flags, message):
    assert main(["serve", "--ckpt", str(vector_run), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_web_extra_names_the_install_command(monkeypatch, capsys):
    import jumpflow.serve as serve

    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--ckpt", "anything"]) == 2
    assert "pip install 'jumpflow[serve]'" in capsys.readouterr().err
