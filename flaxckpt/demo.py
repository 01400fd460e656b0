"""Demo: interrupt a Flax training run, checkpoint it, resume in a new process.

Run with `make demo` or `python -m flaxckpt.demo`. The demo

1. trains a small MLP (flax.linen + optax.adam, fixed seeds) for TOTAL_STEPS
   steps without interruption and records the loss of every step;
2. trains a fresh copy with a `CheckpointManager` (async saves every
   SAVE_EVERY steps; it keeps the step with the best validation loss
   (`best_fn`, `max_to_keep=1`) plus the newest step) and is interrupted after
   step SAVE_STEP;
3. starts a new Python process (`--resume`) that opens the same manager,
   restores `latest_step()` into a fresh TrainState through an abstract
   target, and trains on to TOTAL_STEPS;
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
SAVE_EVERY = 5
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


def make_validation_data() -> tuple[np.ndarray, np.ndarray]:
    """Held-out data from the same function, used only to rank checkpoints."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    w = np.random.default_rng(0).normal(size=(8, 1)).astype(np.float32)
    return x, np.sin(x @ w).astype(np.float32)


def checkpoint_manager(root: Path, read_only: bool = False) -> ocp.CheckpointManager:
    """Saves every SAVE_EVERY steps in the background; keeps the step with the lowest
    validation loss and, whatever its loss, the newest one (to resume from)."""
    return ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        save_interval_steps=SAVE_EVERY, max_to_keep=1, keep_latest=1,
        best_fn=lambda metrics: metrics['val_loss'], best_mode='min',
        read_only=read_only))


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


@jax.jit
def eval_loss(state, x, y):
    return jnp.mean((state.apply_fn({'params': state.params}, x) - y) ** 2)


def train(state, data, until_step: int, after_step=None):
    """Trains to `until_step`; the minibatch is chosen by the step number.

    `after_step(state)` runs after every step (the demo saves checkpoints there).
    """
    x, y = data
    losses = []
    while int(state.step) < until_step:
        start = int(state.step) * BATCH_SIZE % NUM_SAMPLES
        batch = slice(start, start + BATCH_SIZE)
        state, loss = train_step(state, x[batch], y[batch])
        losses.append(float(loss))
        if after_step is not None:
            after_step(state)
    return state, losses


def resume(ckpt_dir: Path, losses_file: Path) -> None:
    """Child process: restore the latest step and train on to TOTAL_STEPS."""
    target = fresh_state()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with checkpoint_manager(ckpt_dir, read_only=True) as manager:
        step = manager.latest_step()
        # apply_fn and tx are not pytree leaves: they come from the target.
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    print(f'[resume] restored step {step} (latest_step()); the restored tree:')
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
    ckpt_dir = out / 'checkpoints'
    losses_file = out / 'resumed_losses.json'
    data = make_data()

    print(f'1) uninterrupted run: {TOTAL_STEPS} steps')
    _, reference = train(fresh_state(), data, TOTAL_STEPS)

    print(f'2) interrupted run: {SAVE_STEP} steps with a CheckpointManager '
          f'(async save every {SAVE_EVERY} steps), then stop')
    val_x, val_y = make_validation_data()
    manager = checkpoint_manager(ckpt_dir)

    def save(state):
        step = int(state.step)
        if manager.should_save(step):
            val_loss = float(eval_loss(state, val_x, val_y))
            manager.save(step, args=ocp.args.StandardSave(state),
                         metrics={'val_loss': val_loss})
            print(f'   saved step {step:>2}: val_loss {val_loss:.6f}')

    state, before = train(fresh_state(), data, SAVE_STEP, after_step=save)
    manager.wait_until_finished()
    kept, best, latest = manager.all_steps(), manager.best_step(), manager.latest_step()
    print(f'   steps kept in {ckpt_dir}: {kept}')
    for step in kept:
        why = []
        if step == best:
            why.append('best val_loss (max_to_keep=1)')
        if step == latest:
            why.append('newest (keep_latest=1)')
        print(f'     step {step:>2}: val_loss {manager.metrics(step)["val_loss"]:.6f}  '
              f'-> {", ".join(why)}')
    manager.close()
    print(f'   files of the newest step ({latest}):')
    list_files(ckpt_dir / str(latest))

    print(f'3) new process restores latest_step() and trains to step {TOTAL_STEPS}')
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
