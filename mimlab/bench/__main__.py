from mimlab.bench.cli import main

main()
