from bloodcell.cli import main

main()
