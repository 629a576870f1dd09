from llamac.cli import main

main()
