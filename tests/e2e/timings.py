"""Boot and restore times reported at the end of an e2e session (BENCHMARKS.md
"Lab"). A module of its own: pytest loads conftest.py as `e2e.conftest`
while test modules import `tests.e2e.conftest`, two module objects, so a
list kept in conftest.py would miss what the test modules' calls add."""

BOOT_TIMES: list[str] = []
