#ifndef GREET_GREET_H_
#define GREET_GREET_H_

#include <string>

namespace greet {

std::string Greeting(const std::string& who);

}  // namespace greet

#endif  // GREET_GREET_H_
