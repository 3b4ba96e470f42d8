from eval.bench.cli import main

main()
