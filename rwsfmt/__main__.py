"""`python -m rwsfmt` runs the command line."""

from rwsfmt_cli.main import main

main(prog_name="rwsfmt")
