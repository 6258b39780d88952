from bigvit.train.cli import main

main()
