"""``orbax.checkpoint.step``: the names of ``flaxckpt.path.step`` (step naming and lookup)."""

from __future__ import annotations

from flaxckpt.path.step import (ALLOWED_STEP_NAME_PATTERN, TMP_DIR_STEP_PATTERN, TMP_DIR_SUFFIX,
                                Metadata, NameFormat, all_temporary_paths, any_checkpoint_step,
                                build_step_metadatas, build_step_path, checkpoint_steps,
                                checkpoint_steps_paths, composite_name_format, find_step_path,
                                get_save_directory, is_checkpoint_finalized, is_path_finalized,
                                is_path_temporary, is_standard_name_format, is_tmp_checkpoint,
                                latest_step_metadata, maybe_find_step_metadata,
                                single_host_load_and_broadcast_name_format,
                                standard_name_format, step_from_checkpoint_name,
                                step_metadata_of_checkpoint_path, step_prefix_with_underscore,
                                tmp_checkpoints)

__all__ = [
    'ALLOWED_STEP_NAME_PATTERN', 'Metadata', 'NameFormat', 'TMP_DIR_STEP_PATTERN',
    'TMP_DIR_SUFFIX', 'all_temporary_paths', 'any_checkpoint_step', 'build_step_metadatas',
    'build_step_path', 'checkpoint_steps', 'checkpoint_steps_paths', 'composite_name_format',
    'find_step_path', 'get_save_directory', 'is_checkpoint_finalized', 'is_path_finalized',
    'is_path_temporary', 'is_standard_name_format', 'is_tmp_checkpoint',
    'latest_step_metadata', 'maybe_find_step_metadata',
    'single_host_load_and_broadcast_name_format', 'standard_name_format',
    'step_from_checkpoint_name', 'step_metadata_of_checkpoint_path',
    'step_prefix_with_underscore', 'tmp_checkpoints',
]
