# Copyright (c) mmlocal contributors.
