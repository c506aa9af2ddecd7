from starmesh.cli.main import main

main()
