# Sourced by the frontier scripts: commit one published point (results/frontier/NAME and the index) on the current
# branch, retrying while another run holds the git index. Uses RESULTS and COMMIT (1 commits, else skip).
commit_point() {  # NAME MESSAGE
  [ "${COMMIT:-1}" = 1 ] || return 0
  for _ in 1 2 3 4 5; do
    git add "$RESULTS/$1" "$RESULTS/index.json" && git commit -q -m "$2" -- "$RESULTS" && return 0
    sleep 20
  done
  return 1
}
