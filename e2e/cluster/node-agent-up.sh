#!/usr/bin/env bash
# placeholder until the node agent CLI lands
exit 0
