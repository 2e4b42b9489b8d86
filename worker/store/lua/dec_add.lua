-- Test hook for the decimal routine: ARGV[1] + ARGV[2].
return dec_add(ARGV[1], ARGV[2])
