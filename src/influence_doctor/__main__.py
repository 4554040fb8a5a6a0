import sys

from influence_doctor.cli import main

sys.exit(main())
