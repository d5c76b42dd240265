from wina.cli import main

main()
