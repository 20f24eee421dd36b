from vlmopt.cli import main

main()
