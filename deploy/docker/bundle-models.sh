#!/bin/sh
# Copy the bundled models into the image (the Dockerfile's bundled-models stage).
#
#   bundle-models.sh SOURCE DEST [NAMES]
#
# Copies every diffusers pipeline directory in SOURCE (a directory holding model_index.json) to
# DEST/<name>, or only the space-separated NAMES. Python packages and files in SOURCE (training
# code) are left out. Fails when a named model is missing or nothing would be bundled.
set -eu
source_dir=$1
dest_dir=$2
names=${3:-}

if [ -z "$names" ]; then
    for dir in "$source_dir"/*/; do
        [ -f "${dir}model_index.json" ] && names="$names $(basename "$dir")"
    done
fi
[ -n "$names" ] || { echo "bundle-models: no model directory (with model_index.json) in $source_dir" >&2; exit 1; }

mkdir -p "$dest_dir"
for name in $names; do
    if [ ! -f "$source_dir/$name/model_index.json" ]; then
        echo "bundle-models: $name is not a model directory (no $source_dir/$name/model_index.json)" >&2
        exit 1
    fi
    cp -R "$source_dir/$name" "$dest_dir/$name"
    # no byte code or editor leftovers from a development checkout
    find "$dest_dir/$name" -name __pycache__ -prune -exec rm -rf {} +
    echo "bundle-models: $name"
done
