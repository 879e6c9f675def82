from loratool.cli.main import main

main()
