from taskproxy.cli import run

run()
