"""The library speaks (issue 28): ``fit`` off a terminal writes one plain line per epoch to stderr
where the application configured no logging, once through the application's logging where it
did, nothing with ``show_progress=False`` or a level that hides INFO; ``recvae train`` prints
each line once. Each case runs in a fresh interpreter (its own logging state), stderr a pipe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_runs import log_csv, train_argv  # noqa: F401  (log_csv: the fixture, shared)

ROOT = Path(__file__).resolve().parents[1]

FIT = """
import sys
sys.path.insert(0, {tests!r})
from synthetic import planted
from recvae.models import MultVAE
model = MultVAE({model_args}, hidden_dims=(), latent_dim=2, batch_size=40, device="cpu", precision="fp32")
model.fit(planted(n_users=40, n_items=12, n_clusters=2, per_user=3){fit_args})
"""

EPOCH = re.compile(r"epoch (\d)/(\d), loss \d+\.\d{4}, beta 0\.\d{4} \(\d+\.\d s\)")


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def fit(setup: str = "", fit_args: str = "", model_args: str = "epochs=2") -> subprocess.CompletedProcess:
    done = python(textwrap.dedent(setup) + FIT.format(tests=str(ROOT / "tests"), fit_args=fit_args,
                                                      model_args=model_args))
    assert done.returncode == 0, done.stderr
    return done


def epoch_lines(text: str) -> list[str]:
    return [m.group(1) + "/" + m.group(2) for m in EPOCH.finditer(text)]


def test_no_logging_configured_one_plain_line_per_epoch_on_stderr():
    done = fit()
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(EPOCH.fullmatch(line) for line in lines), done.stderr
    assert epoch_lines(done.stderr) == ["1/2", "2/2"] and done.stdout == ""


def test_show_progress_false_is_silent():
    done = fit(fit_args=", show_progress=False")
    assert done.stderr == "" and done.stdout == ""


@pytest.mark.parametrize("setup", [
    'import logging; logging.getLogger("recvae").setLevel(logging.WARNING)',
    "import logging; logging.basicConfig()",  # the application's WARNING
    "import logging; logging.disable(logging.INFO)",
])
def test_a_level_the_application_set_hides_the_lines(setup):
    assert fit(setup).stderr == ""


def test_basic_config_at_info_takes_over_once():
    done = fit("import logging; logging.basicConfig(level=logging.INFO, format='%(name)s| %(message)s')")
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith("recvae.models.training_loop| epoch ") for line in lines)
    assert epoch_lines(done.stderr) == ["1/2", "2/2"]


def test_a_handler_on_the_library_logger_takes_over_once():
    done = fit("""
        import logging, sys
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
        logging.getLogger("recvae").addHandler(handler)
        logging.getLogger("recvae").setLevel(logging.INFO)
    """)
    assert done.stderr == ""
    assert epoch_lines(done.stdout) == ["1/2", "2/2"] and len(done.stdout.splitlines()) == 2
    assert all(line.startswith("[INFO] epoch ") for line in done.stdout.splitlines())


def test_the_early_stop_is_said_after_its_epoch():
    done = fit(fit_args=", validation=lambda model, s=iter([0.5, 0.4]): next(s)", model_args="epochs=5, patience=1")
    lines = done.stderr.splitlines()
    assert len(lines) == 3, done.stderr
    assert lines[0].startswith("epoch 1/5, loss ") and "validation NDCG@100 0.5000" in lines[0]
    assert lines[1].startswith("epoch 2/5, loss ") and "validation NDCG@100 0.4000" in lines[1]
    assert lines[2] == ("early stop after epoch 2: no validation NDCG@100 gain in 1 epochs; keeping epoch 1 "
                        "(patience none trains every epoch)")


def test_train_prints_each_epoch_once(log_csv, tmp_path):  # noqa: F811
    """`recvae train` configures logging itself (basicConfig): its lines are the application's."""
    argv = [a for a in train_argv(log_csv, tmp_path / "run", epochs=3) if a != "-q"]
    argv[argv.index("--n-heldout-users") + 1] = "50"  # no warning about few held-out users
    done = subprocess.run([sys.executable, "-m", "recvae", *argv], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/3", "epoch 2/3",
                                                                                   "epoch 3/3"], done.stderr
    assert len(set(lines)) == len(lines), done.stderr  # no line twice
