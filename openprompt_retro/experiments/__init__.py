"""The experiments behind the CLI: task data, backbones, runs, report, speed, store benchmark, big pool,
memorization and figures. They use the library; the library never imports them."""
