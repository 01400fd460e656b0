"""Demo: interrupt a Flax training run, checkpoint it, resume in a new process.

Run with `make demo` or `python -m flaxckpt.demo`. The demo

1. trains a small MLP (flax.linen + optax.adam, fixed seeds) for TOTAL_STEPS
   steps without interruption and records the loss of every step;
2. trains a fresh copy for SAVE_STEP steps and saves its TrainState with
   `AsyncCheckpointer(StandardCheckpointHandler())`;
3. starts a new Python process (`--resume`) that builds a fresh TrainState,
   restores the checkpoint into it with `StandardCheckpointer().restore` and an
   abstract target, and trains on to TOTAL_STEPS;
4. checks that the resumed losses equal the uninterrupted ones bit for bit.

Everything it writes goes to ./demo_output/, which is wiped at the start.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import flaxckpt as ocp

OUTPUT_DIR = Path('demo_output')
TOTAL_STEPS = 40
SAVE_STEP = 20
NUM_SAMPLES = 256
BATCH_SIZE = 64


class MLP(nn.Module):
    """Two hidden layers, one output: y ≈ f(x) for x in R^8."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(1)(x)


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic regression data, identical in every process."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_SAMPLES, 8)).astype(np.float32)
    w = rng.normal(size=(8, 1)).astype(np.float32)
    y = np.sin(x @ w) + 0.1 * rng.normal(size=(NUM_SAMPLES, 1))
    return x, y.astype(np.float32)


def fresh_state() -> train_state.TrainState:
    model = MLP()
    params = model.init(jax.random.key(42), jnp.zeros((1, 8)))['params']
    return train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


@jax.jit
def train_step(state, x, y):
    def loss_fn(params):
        pred = state.apply_fn({'params': params}, x)
        return jnp.mean((pred - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def train(state, data, until_step: int):
    """Trains to `until_step`; the minibatch is chosen by the step number."""
    x, y = data
    losses = []
    while int(state.step) < until_step:
        start = int(state.step) * BATCH_SIZE % NUM_SAMPLES
        batch = slice(start, start + BATCH_SIZE)
        state, loss = train_step(state, x[batch], y[batch])
        losses.append(float(loss))
    return state, losses


def resume(ckpt_dir: Path, losses_file: Path) -> None:
    """Child process: restore the checkpoint and train on to TOTAL_STEPS."""
    target = fresh_state()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    checkpointer = ocp.StandardCheckpointer()
    # apply_fn and tx are not pytree leaves: they come from the target.
    state = checkpointer.restore(ckpt_dir, abstract)
    checkpointer.close()
    print(f'[resume] restored step {int(state.step)}; the restored tree:')
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator='/')
        dtype = getattr(leaf, 'dtype', type(leaf).__name__)
        print(f'  {name:<38} {str(np.shape(leaf)):<9} {dtype}')
    _, losses = train(state, make_data(), TOTAL_STEPS)
    losses_file.write_text(json.dumps(losses))


def list_files(root: Path) -> None:
    files = sorted(p for p in root.rglob('*') if p.is_file())
    for p in files:
        print(f'  {str(p.relative_to(root)):<52} {p.stat().st_size:>8} B')
    total = sum(p.stat().st_size for p in files)
    print(f'  {len(files)} files, {total} bytes')


def same_bits(a: list[float], b: list[float]) -> bool:
    return (len(a) == len(b) and np.asarray(a, np.float32).tobytes()
            == np.asarray(b, np.float32).tobytes())


def main() -> int:
    out = OUTPUT_DIR.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ckpt_dir = out / f'checkpoint_step_{SAVE_STEP}'
    losses_file = out / 'resumed_losses.json'
    data = make_data()

    print(f'1) uninterrupted run: {TOTAL_STEPS} steps')
    _, reference = train(fresh_state(), data, TOTAL_STEPS)

    print(f'2) interrupted run: {SAVE_STEP} steps, then save')
    state, before = train(fresh_state(), data, SAVE_STEP)
    checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
    checkpointer.save(ckpt_dir, args=ocp.args.StandardSave(state))
    checkpointer.wait_until_finished()
    checkpointer.close()
    print(f'   checkpoint written to {ckpt_dir}')
    list_files(ckpt_dir)

    print(f'3) new process restores it and trains to step {TOTAL_STEPS}')
    sys.stdout.flush()  # the child writes to the same stdout
    child = subprocess.run([sys.executable, '-m', 'flaxckpt.demo', '--resume',
                            str(ckpt_dir), '--losses', str(losses_file)],
                           check=False)
    if child.returncode != 0:
        print(f'FAIL: the resume process exited with {child.returncode}')
        return 1
    resumed = before + json.loads(losses_file.read_text())

    print(f'4) loss per step; "resumed" = steps 1-{SAVE_STEP} before the save,'
          ' then the new process')
    print('   (* marks the first step after the restore)')
    print(f'  {"step":>4}  {"uninterrupted":>14}  {"resumed":>14}')
    differing = 0
    for step, (ref, res) in enumerate(zip(reference, resumed), start=1):
        equal = same_bits([ref], [res])
        differing += not equal
        if equal and step % 5 and step not in (1, SAVE_STEP + 1):
            continue  # keep the table short; differing steps always show
        mark = '*' if step == SAVE_STEP + 1 else ' '
        flag = '' if equal else '  <- differs'
        print(f' {mark}{step:>4}  {ref:>14.9f}  {res:>14.9f}{flag}')
    if same_bits(reference, resumed):
        print(f'PASS: all {TOTAL_STEPS} losses are bitwise equal to the '
              'uninterrupted run')
        return 0
    print(f'FAIL: {differing} of {len(reference)} losses differ from the '
          f'uninterrupted run ({len(resumed)} resumed losses)')
    return 1


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--resume', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--losses', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.resume is None) != (args.losses is None):
        parser.error('--resume and --losses go together')
    if args.resume is not None:
        resume(args.resume, args.losses)
        sys.exit(0)
    sys.exit(main())
