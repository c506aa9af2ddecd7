from starmesh.cli.main import main

main(prog_name="starmesh")
