"""`make demo` is the main job: it must keep passing."""

import subprocess
import sys


def test_demo_resumes_training_bit_for_bit(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'flaxckpt.demo'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'PASS: all 40 losses are bitwise equal' in result.stdout
  assert 'steps kept in' in result.stdout and 'newest (keep_latest=1)' in result.stdout
  assert 'best val_loss (max_to_keep=1)' in result.stdout
  assert '[resume] restored step 20 (latest_step())' in result.stdout
  assert (tmp_path / 'demo_output').is_dir()
