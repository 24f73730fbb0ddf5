"""The red-team table: each finding of the hardening reviews (issues 33 and 41), the hostile
input, what the tools now answer, and the tests that reproduce it.

``make redteam`` runs exactly these tests (conftest marks them ``redteam``); ``make test`` runs
them too. ``tests/test_redteam.py`` keeps the table honest: every test named here exists, and
each row's expected message is asserted, word for word, by one of its tests.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    finding: str  # issue.bullet: the review's words, shortened
    input: str  # the hostile input or fault
    exit: str  # what the command or server answers
    message: str  # a phrase one of the tests asserts
    tests: tuple[str, ...]  # node ids (file::function), relative to tests/


TABLE: tuple[Case, ...] = (
    # --- issue 33: the repository writer, image decoding, the server, engines, stops -------
    Case(
        "33.1 triton-repo replaced a folder it did not write",
        "triton-repo --out DIR --name NAME over a user folder, a run's engines or checkpoints",
        "exit 2, nothing changed",
        "not written by",
        ("export/test_triton_repo.py::test_a_folder_it_did_not_write_is_never_replaced",),
    ),
    Case(
        "33.1 two tasks' label files collided",
        "tasks 'a b' and 'A_b' (labels_a_b.txt on a case-insensitive file system)",
        "ExportError (exit 2), nothing written",
        "share the label file labels_A_b",
        ("export/test_triton_repo.py::test_tasks_whose_label_files_collide_are_refused",),
    ),
    Case(
        "33.2 client bytes started Ghostscript",
        "EPS and PDF bytes (to predict, the runtime, the server) with a fake gs on PATH",
        "refused as not an allowed image format; gs never runs",
        "not a readable image in an allowed format",
        ("runtime/test_image_formats.py::test_eps_and_pdf_are_refused_without_running_anything",),
    ),
    Case(
        "33.3 one request stopped the server",
        "KServe JSON with shape 2^31, 2^31 task ids, a 1 MB gzip bomb, non-KServe JSON",
        "HTTP 400 / 413 / 415, the server still ready",
        "larger than 67108864 bytes",
        (
            "runtime/test_serving.py::test_hostile_requests_are_refused_before_the_engine",
            "runtime/test_serving.py::test_grpc_requests_are_bounded_by_triton",
        ),
    ),
    Case(
        "33.4 stops and failed starts left debris",
        "SIGTERM under load; SIGTERM / SIGINT / SIGKILL while starting; a model that fails",
        "0 after answering what is in flight; 130 interrupted; 2 naming the model; no leftovers",
        "interrupted",
        (
            "cli/test_serve_cli.py::test_sigterm_answers_the_requests_in_flight_then_exits_0",
            "cli/test_serve_cli.py::test_a_stop_while_starting_leaves_nothing",
            "runtime/test_serving.py::test_the_next_start_removes_what_a_dead_server_left",
        ),
    ),
    Case(
        "33.4 --log-file ignored silently",
        "serve --log-file FOLDER, or a file in a missing folder",
        "exit 2 before starting",
        "is a folder",
        ("cli/test_serve_cli.py::test_serve_refuses_bad_input",),
    ),
    Case(
        "33.5 a changed engine answered wrongly with exit 0",
        "task order swapped, class names reversed, mean/std or resize changed, bytes flipped",
        "exit 2 from load, predict, info, eval-engine, serve and triton-repo (nothing written)",
        "changed or corrupted after export",
        (
            "runtime/test_integrity.py::test_a_changed_engine_is_refused",
            "runtime/test_integrity.py::test_serve_refuses_a_changed_engine_before_its_server_starts",
            "runtime/test_integrity.py::test_eval_engine_refuses_a_changed_engine_before_reading_data",
            "export/test_triton_repo.py::test_a_changed_engine_is_not_published",
        ),
    ),
    Case(
        "33.6 finite garbage was exported",
        "adapters scaled to 1e30 (fp32 and fp16), a merged weight beyond fp16's range",
        "exit 2 naming the file and tensor, no engine written",
        "no engine was exported",
        (
            "export/test_export.py::test_finite_garbage_is_named_by_file_and_tensor",
            "export/test_export.py::test_cli_export_refuses_adapters_scaled_by_1e30",
        ),
    ),
    Case(
        "33.7 the stat cache trusted a file changed in place",
        "merged model and cache entry edited with size, inode and mtime kept",
        "exit 2 naming the file before publishing",
        "is not the file this run made",
        (
            "run/test_reliability.py::test_33_7_what_an_engine_or_adapters_are_made_from_is_hashed_from_its_bytes",
        ),
    ),
    Case(
        "33.8 distributed stops left orphans and tracebacks",
        "the launcher killed; SIGTERM to it; a rank killed",
        "workers die with the launcher; 130 / 3 with one paragraph",
        "was killed by SIGKILL",
        (
            "test_distributed.py::test_a_rank_dies_with_the_process_that_started_it",
            "test_distributed.py::test_the_launcher_prints_the_cause_once_with_its_exit_code",
        ),
    ),
    Case(
        "33.9 predict hung on a link loop, skipped a folder silently",
        "a folder with a symlink loop; an unreadable subfolder",
        "each folder once; the unreadable one a skipped input (exit 1, named)",
        "Skipped 1 input(s)",
        (
            "runtime/test_inputs.py::test_links_back_into_a_folder_are_followed_once",
            "runtime/test_inputs.py::test_an_unreadable_folder_is_a_skipped_input",
        ),
    ),
    # --- issue 41: inputs that lie to a run ------------------------------------------------
    Case(
        "41.1 images counted many times, a FIFO hung the run",
        "a link 'loop -> .' in a class folder; a FIFO named zz.png",
        "the same images as without them; the FIFO skipped with a named warning",
        "zz.png (a FIFO (named pipe), not a file)",
        (
            "data/test_disk_data.py::test_links_and_fifos_never_change_the_image_count",
            "test_io.py::test_a_walk_enters_each_folder_once_and_opens_no_fifo",
        ),
    ),
    Case(
        "41.2 a 470-byte YAML alias bomb took 14.7 GB",
        "nested aliases; 51 levels of nesting; a config over 1 MiB",
        "exit 2 before expanding, naming the file and line",
        "the alias \\*a is not allowed",
        ("test_io.py::test_yaml_aliases_are_refused_before_they_expand",),
    ),
    Case(
        "41.3 checkpoints not checked against their content",
        "noisy adapters, a rotated head, a noisy merge or expert, a decoded split edited",
        "exit 2 naming the file and the command that remakes it",
        "is not the file this run made: its content changed",
        (
            "run/test_reliability.py::test_41_3_a_checkpoint_that_changed_since_the_run_made_it_is_refused",
            "run/test_reliability.py::test_41_3_the_remake_command_for_an_expert_keeps_the_runs_settings",
            "data/test_disk_data.py::test_a_decoded_split_changed_in_place_is_decoded_again",
        ),
    ),
    Case(
        "41.4 resume states not checked",
        "a resume checkpoint with flipped bytes, or finitely perturbed",
        "not resumed: training starts from step 0, saying why",
        "does not match the digest it was saved with",
        ("run/test_reliability.py::test_41_4_a_resume_state_that_changed_is_not_resumed",),
    ),
    Case(
        "41.5 messages that named nothing, after the work",
        "eval-engine --out FOLDER; a FIFO engine; --device cuda; --nproc 2 --batch-size 1",
        "exit 2 with one paragraph, before any work or process",
        "is 1, smaller than the 2 processes",
        (
            "run/test_reliability.py::test_41_5_messages_name_the_problem_before_any_work",
            "test_distributed.py::test_settings_are_checked_before_any_process_starts",
        ),
    ),
)


def node_ids() -> set[str]:
    """Every test the table names, as ``file::function`` relative to tests/."""
    return {test for case in TABLE for test in case.tests}
