from torchnode.cli import main

main()
