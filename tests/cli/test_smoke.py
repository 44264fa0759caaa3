from conftest import run_charlm


def test_tiny_run_samples(tiny_run):
    assert (tiny_run / "best.pt").exists() and (tiny_run / "last.pt").exists()
    proc = run_charlm("sample", "-c", tiny_run / "best.pt", "--seed", "First", "-n", "20",
                      "--random-seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("First") and len(proc.stdout.rstrip("\n")) == 25
