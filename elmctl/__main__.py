from elmctl.cli.main import run

run()
